"""Running a study: the shared data, the base model's row, each variant (trained, scored, its peak memory measured,
resumable), zero-shot templates, the best and worst captions, and the side-by-side captions."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from ...evaluation.metrics import metric_names
from ...training.arguments import parse_train_arguments, read_config_file
from ...utils.io import DiskFullError, file_digest, read_json, write_json_atomic
from .config import BASE_ROW, RUN_DEFAULTS, Study, StudyConfigError, base_arguments
from .report import format_duration, write_report

__all__ = [
    "RESULT_FILE",
    "RUN_DEFAULTS",
    "StudyData",
    "StudyProgress",
    "ensure_base_model",
    "run_study",
    "run_variant",
]


logger = logging.getLogger(__name__)

RESULT_FILE = "study_result.json"
# Beside each variant's result and checkpoints: the settings they were made with (`_settings`).
SETTINGS_FILE = "study_settings.json"
# The data options that describe the built-in synthetic set, written once for the whole study.
SYNTHETIC_ARGUMENTS = ("synthetic_train_images", "synthetic_val_images", "synthetic_image_size", "synthetic_domain",
                       "synthetic_dir")


# ---------------------------------------------------------------------------------------------------------------
# Progress


class StudyProgress:
    """Prints which variant runs, its step, its latest CIDEr and the estimated time left for the whole study."""

    def __init__(self, total_variants: int, enabled: bool = True, every_seconds: float = 5.0):
        self.total, self.enabled, self.every = total_variants, enabled, every_seconds
        self.study_start = time.time()
        self.durations: list[float] = []
        self.index = 0
        self.name = ""
        self.variant_start = self.study_start
        self.first_step = self.step = self.max_steps = 0
        self.cider: float | None = None
        self.last_print = 0.0

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[study] {message}", flush=True)

    def start_variant(self, index: int, name: str) -> None:
        self.index, self.name, self.variant_start = index, name, time.time()
        self.first_step = self.step = self.max_steps = 0
        self.cider = None

    def end_variant(self, trained: bool) -> None:
        if trained:
            self.durations.append(time.time() - self.variant_start)

    def time_left(self) -> float | None:
        elapsed = time.time() - self.variant_start
        done = self.step - self.first_step
        current_total = None
        if done > 0 and self.max_steps:
            current_total = elapsed / done * (self.max_steps - self.first_step)
        per_variant = (sum(self.durations) / len(self.durations)) if self.durations else current_total
        if per_variant is None:
            return None
        current_left = max(0.0, (current_total if current_total is not None else per_variant) - elapsed)
        return current_left + per_variant * (self.total - self.index)

    def update(self, step: int, max_steps: int, cider: float | None = None, force: bool = False) -> None:
        self.step, self.max_steps = step, max_steps
        if cider is not None:
            self.cider = cider
        if not (force or time.time() - self.last_print >= self.every):
            return
        self.last_print = time.time()
        left = self.time_left()
        cider_text = "-" if self.cider is None else f"{self.cider:.4f}"
        self.say(f"variant {self.index}/{self.total} {self.name}: step {step}/{max_steps}, CIDEr {cider_text}, "
                 f"elapsed {format_duration(time.time() - self.study_start)}, "
                 f"left ~{'?' if left is None else format_duration(left)}")


class _ProgressCallback(TrainerCallback):
    def __init__(self, progress: StudyProgress):
        self.progress = progress
        self.log_history: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.first_step = state.global_step
        self.progress.update(state.global_step, state.max_steps, force=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(state.global_step, state.max_steps)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_cider" in metrics:
            self.progress.update(state.global_step, state.max_steps, cider=metrics["eval_cider"], force=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.log_history = list(state.log_history)  # restored from the checkpoint when resumed: complete


# ---------------------------------------------------------------------------------------------------------------
# Peak memory of one variant


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory() -> tuple[int | None, str]:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "GPU memory allocated by torch"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak resident memory of the process (CPU)"
    except OSError:
        pass
    return None, "not measured on this platform"


# ---------------------------------------------------------------------------------------------------------------
# Running


@dataclass
class StudyData:
    train_json: str
    train_images: str
    val_json: str
    val_images: str
    arguments: dict  # what every variant gets: the four paths and the other data options


def _prepare_data(study: Study, output_dir: Path, progress: StudyProgress, held: contextlib.ExitStack) -> StudyData:
    """The study's COCO-style files; the synthetic set is written once per set of options (`written.json` records
    them), not again on every run or rerun, and stays marked in use until `held` closes (`synthetic_set`)."""
    from ...data.synthetic import synthetic_set
    from ...training.arguments import DataArguments

    data = dict(study.data)
    synthetic = {key: data.pop(key) for key in SYNTHETIC_ARGUMENTS if key in data}
    if not data.get("train_json"):
        options = DataArguments(**synthetic).synthetic_options()
        root = Path(synthetic.get("synthetic_dir") or output_dir / "data")
        paths = held.enter_context(synthetic_set(root, options, progress.say, job="study",
                                                 setting="data.synthetic_dir"))
        data.update(train_json=str(paths.train_json), train_images=str(paths.train_images),
                    val_json=str(paths.val_json), val_images=str(paths.val_images))
    else:
        missing = [key for key in ("train_images", "val_json", "val_images") if not data.get(key)]
        if missing:
            raise StudyConfigError(f"study file {study.path}: 'data' needs {missing} with train_json")
    return StudyData(data["train_json"], data["train_images"], data["val_json"], data["val_images"], data)


def ensure_base_model(study: Study, progress: StudyProgress) -> None:
    """Trains the base model first when its folder is missing and the study says how (`base.train_config`)."""
    from ...training.run import run_training

    model = study.base.get("model")
    train_config = study.base.get("train_config")
    if not model or not train_config or (Path(model) / "config.json").is_file():
        return
    if train_config == "default":
        values, source = {}, "train.py's default job"
    else:  # as load_study checked it
        values, source = read_config_file(Path(train_config)), train_config
    progress.say(f"base model {model} not found: training it first ({source})")
    run_training(*parse_train_arguments({**values, "output_dir": model}))


def _score(study: Study, folder: Path, data: StudyData, clip) -> dict:
    """`eval.py score` on the folder's saved predictions, written beside them as scores.json."""
    from ...evaluation.jobs import score_predictions

    report = score_predictions(folder / "eval_predictions.json", data.val_json, data.val_images,
                               clip_model=clip, clip_prefix=study.clip_prefix, train_annotations=data.train_json,
                               metrics=study.metrics, output=folder / "scores.json", progress=False)
    return {"metrics": report.metrics, "skipped": report.skipped}


def _evaluate_base(study: Study, data: StudyData, output_dir: Path, clip, progress: StudyProgress) -> dict:
    """The base model's scores on the study's validation set before any fine-tuning (the table's first row),
    captioned from the shared feature cache."""
    from ...data.captions import CaptionCollator, load_coco_captions, references_per_image
    from ...data.feature_cache import CachedFeatureCollator, EncoderFeatureCache
    from ...training.peft_methods import count_parameters
    from ...training.run import build_processor_and_model
    from ...training.trainer import CaptionTrainer

    folder = output_dir / "variants" / BASE_ROW
    finished = _earlier_result(study, folder, _settings(study, {}, data), data, clip, "base model", progress)
    if finished:
        progress.say("base model: already evaluated, skipped")
        return finished
    progress.say("evaluating the base model before fine-tuning")
    start = time.time()
    model_args, data_args, _, training_args = parse_train_arguments(
        {**RUN_DEFAULTS, **study.recipe, **data.arguments, **base_arguments(study.base), "output_dir": str(folder)})
    processor, model, _ = build_processor_and_model(model_args, {}, [])
    model.generation_config.update(**training_args.generation_settings())
    model.requires_grad_(False).to(training_args.device).eval()
    val_rows = references_per_image(load_coco_captions(data.val_json, data.val_images))
    collator = CaptionCollator(processor, max_length=data_args.max_caption_length)
    cache = EncoderFeatureCache(output_dir / "feature-cache", model, processor)
    cache.build(val_rows, batch_size=training_args.per_device_eval_batch_size)
    trainer = CaptionTrainer(model=model, args=training_args, eval_dataset=val_rows, processing_class=processor,
                             eval_collator=CachedFeatureCollator(collator, cache))
    trainer.evaluate()
    _, total = count_parameters(model)
    result = {"name": BASE_ROW, "status": "ok", "settings": {"model": "before fine-tuning"},
              "method": "none", "trainable_parameters": 0, "total_parameters": total, "train_runtime_s": 0.0,
              "peak_memory_bytes": None, "peak_memory_kind": "", "best_epoch": None, "log_history": [],
              **_score(study, folder, data, clip), "wall_time_s": time.time() - start}
    write_json_atomic(folder / RESULT_FILE, result)
    return result


def _finished(folder: Path) -> dict | None:
    path = folder / RESULT_FILE
    if path.is_file():
        result = read_json(path)
        if result.get("status") == "ok":
            return result
    return None


def _settings(study: Study, overrides: dict, data: StudyData) -> dict:
    """Everything a row's result depends on: the train.py arguments of the variant (the recipe, the data section, the
    base model, its own overrides), how it is scored, and the bytes of the files those name (`_input_digests`). Paths
    inside the study folder are left out, so a moved folder is still recognised. "scoring" holds what only
    `_score` reads (never training nor the saved predictions): a change there rescores the row (`_earlier_result`)."""
    settings = {"training": {**RUN_DEFAULTS, **study.recipe, **study.data, **base_arguments(study.base), **overrides},
                "scoring": {"metrics": study.metrics, "clip_model": study.clip_model,
                            "clip_prefix": study.clip_prefix},
                "inputs": _input_digests(study, data)}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))  # as it reads back from the file


def _input_digests(study: Study, data: StudyData) -> dict:
    """SHA-256 of the captions files and of a local base model's config and weights: a base model retrained or
    replaced in its folder, or captions edited in place, leave the study file as it was, and the rows made from the
    old ones must not be reported (nor their adapters drawn on the new base). Images are not hashed (there may be
    many thousands); a Hub id is named by the study file alone."""
    files = {"train_json": data.train_json, "val_json": data.val_json}
    base = Path(study.base["model"]) if study.base.get("model") else None
    if base is not None and base.is_dir():
        files.update({f"base/{path.name}": str(path) for path in sorted(base.glob("*.safetensors"))})
        files["base/config.json"] = str(base / "config.json")
    return {role: _digest(path) for role, path in files.items() if path and Path(path).is_file()}


@functools.cache
def _digest_of(path: str, size: int, modified_ns: int) -> str:
    return file_digest(path)


def _digest(path: str) -> str:
    """`file_digest`, once per file version in this process: every row asks for the same files."""
    status = os.stat(path)
    return _digest_of(os.path.realpath(path), status.st_size, status.st_mtime_ns)


def _changes(recorded, settings: dict) -> str:
    """What differs between two `_settings`, as "learning_rate 0.01 -> 0.001, lora_rank 2 -> 4"."""
    def flat(groups) -> dict:
        if not isinstance(groups, dict) or not all(isinstance(values, dict) for values in groups.values()):
            return {"(the whole record)": groups}
        return {key: value for values in groups.values() for key, value in values.items()}

    before, after = flat(recorded), flat(settings)
    return ", ".join(f"{key} {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}"
                     for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key))


def _clear_if_changed(folder: Path, settings: dict, label: str, progress: StudyProgress) -> str | None:
    """Deletes a row's folder (result, checkpoints, predictions) when the study file changed what it was made with,
    so that the row is trained and scored again rather than reported with results of other settings; then records
    the settings the folder's new contents are made with. When only the scoring settings changed, the folder is
    kept and not yet recorded: returns what changed, for the caller to rescore the row and then record them."""
    if folder.is_dir() and any(not path.name.startswith(".train.lock.") for path in folder.iterdir()):
        record = folder / SETTINGS_FILE
        recorded = read_json(record) if record.is_file() else None
        if recorded == settings:
            return None
        # A record made before input files were hashed has no "inputs": trusted once, and their digests recorded
        # from now on.
        if (isinstance(recorded, dict) and recorded.get("training") == settings["training"]
                and recorded.get("inputs", settings["inputs"]) == settings["inputs"]):
            if recorded.get("scoring") == settings["scoring"]:
                write_json_atomic(record, settings)
                return None
            return _changes({"scoring": recorded.get("scoring")}, {"scoring": settings["scoring"]})
        reason = ("its folder records no settings (made by an older version)" if recorded is None
                  else f"settings changed since its last run: {_changes(recorded, settings)}")
        progress.say(f"{label}: {reason}; running it again")
        shutil.rmtree(folder)
    write_json_atomic(folder / SETTINGS_FILE, settings)
    return None


def _earlier_result(study: Study, folder: Path, settings: dict, data: StudyData, clip, label: str,
                    progress: StudyProgress) -> dict | None:
    """The row's finished result from an earlier run when its settings still hold, else None (the row runs). A
    finished row whose scoring settings alone changed (a CLIP model added, a metric dropped) is scored again on its
    saved predictions: its model and predictions are what the same training would make again. Where those cannot be
    read or scored, the row's folder is deleted and the row made again, rather than stopping the whole study on this
    run and on every rerun (its old settings record would ask for the same rescore)."""
    rescore = _clear_if_changed(folder, settings, label, progress)
    finished = _finished(folder)
    if rescore is not None and finished:
        progress.say(f"{label}: scoring settings changed since its last run: {rescore}; scoring its saved "
                     "predictions again (not retrained)")
        try:
            finished = {**finished, **_score(study, folder, data, clip)}
        except DiskFullError:
            raise  # as in run_variant: every later row would fail the same way
        except (OSError, ValueError) as error:  # missing, unreadable, cut short: not what training made
            progress.say(f"{label}: cannot score its saved predictions ({type(error).__name__}: {error}); deleting "
                         f"{folder} and running it again")
            shutil.rmtree(folder)
            finished = None
        else:
            write_json_atomic(folder / RESULT_FILE, finished)
    if rescore is not None:
        # After the new result: a rescore cut short leaves the old record, and the next run rescores again.
        write_json_atomic(folder / SETTINGS_FILE, settings)
    return finished


def _best_epoch(log_history: list[dict]) -> float | None:
    evaluations = [entry for entry in log_history if "eval_cider" in entry and "epoch" in entry]
    if not evaluations:
        return None
    return max(evaluations, key=lambda entry: entry["eval_cider"])["epoch"]


def run_variant(study: Study, index: int, name: str, overrides: dict, data: StudyData, output_dir: Path, clip,
                progress: StudyProgress) -> dict:
    """Trains and scores one variant (or returns its earlier result); a failure is returned as a failed row."""
    from ...training.checkpoints import last_complete_checkpoint
    from ...training.run import run_training

    folder = output_dir / "variants" / name
    progress.start_variant(index, name)
    finished = _earlier_result(study, folder, _settings(study, overrides, data), data, clip,
                               f"variant {index}/{progress.total} {name}", progress)
    if finished:
        progress.say(f"variant {index}/{progress.total} {name}: already finished, skipped")
        return finished
    start = time.time()
    values = {**RUN_DEFAULTS, **study.recipe, **data.arguments,
              **base_arguments(study.base), **overrides, "output_dir": str(folder)}
    if not values.get("train_encoder"):
        values.setdefault("cache_encoder_features", True)
        values.setdefault("feature_cache_dir", str(output_dir / "feature-cache"))
    checkpoint = last_complete_checkpoint(folder) if folder.is_dir() else None
    if checkpoint:
        values["resume_from_checkpoint"] = checkpoint
        progress.say(f"variant {index}/{progress.total} {name}: resuming from {checkpoint}")
    else:
        progress.say(f"variant {index}/{progress.total} {name}: training with {overrides}")
    callback = _ProgressCallback(progress)
    try:
        _reset_peak_memory()
        run_training(*parse_train_arguments(values), callbacks=[callback])
        peak, peak_kind = _peak_memory()
        summary = read_json(folder / "training_summary.json")
        train_metrics = read_json(folder / "train_results.json")
        result = {"name": name, "status": "ok", "settings": overrides, "method": summary["peft_method"],
                  "trainable_parameters": summary["trainable_parameters"],
                  "total_parameters": summary["total_parameters"],
                  "train_runtime_s": train_metrics.get("train_runtime"), "peak_memory_bytes": peak,
                  "peak_memory_kind": peak_kind, "best_epoch": _best_epoch(callback.log_history),
                  "log_history": callback.log_history, "resumed_from": checkpoint,
                  **_score(study, folder, data, clip)}
    except DiskFullError:
        raise  # every later variant would fail the same way: stop, say so; a rerun resumes once there is room
    except Exception as error:  # one variant's failure must not stop the others
        logger.exception("variant %s failed", name)
        result = {"name": name, "status": "failed", "settings": overrides,
                  "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(limit=-6)}
        progress.say(f"variant {index}/{progress.total} {name}: FAILED: {result['error']}")
    result["wall_time_s"] = time.time() - start
    write_json_atomic(folder / RESULT_FILE, result)
    progress.end_variant(trained=result["status"] == "ok")
    if result["status"] == "ok":
        progress.say(f"variant {index}/{progress.total} {name}: CIDEr {result['metrics'].get('cider', float('nan')):.4f}"
                     f" in {format_duration(result['wall_time_s'])}")
    return result


def run_study(study: Study, output_dir, *, show_progress: bool = True) -> dict:
    """Runs (or resumes) every part of the study and writes the report; returns the results.json content. Holds
    the output folder meanwhile (`hold_output_dir`): a second study into it stops at once; and the synthetic set it
    reads (`synthetic_set`)."""
    from ...training.checkpoints import hold_output_dir

    with hold_output_dir(output_dir, job="study"), contextlib.ExitStack() as held:
        return _run_study(study, Path(output_dir), show_progress, held)


def _run_study(study: Study, output_dir: Path, show_progress: bool, held: contextlib.ExitStack) -> dict:
    if study.torch_threads:
        torch.set_num_threads(study.torch_threads)
    progress = StudyProgress(len(study.variants), enabled=show_progress)
    progress.say(f"study {study.name!r} ({study.path}) -> {output_dir}: {len(study.variants)} variants")
    ensure_base_model(study, progress)
    data = _prepare_data(study, output_dir, progress, held)
    clip = None
    if study.clip_model:
        from ...evaluation.clip_score import load_clip

        clip = load_clip(study.clip_model)
    rows = [_evaluate_base(study, data, output_dir, clip, progress)]
    for index, (name, overrides) in enumerate(study.variants, 1):
        rows.append(run_variant(study, index, name, overrides, data, output_dir, clip, progress))
    zero_shot = _run_zero_shot(study, output_dir, clip, progress)
    extremes = _extremes(study, rows, data, output_dir, progress)
    side_by_side = _side_by_side(study, rows, data, output_dir)
    results = {
        "study": study.name,
        "study_file": str(study.path),
        "output_dir": str(output_dir),
        "clip_model": study.clip_model,
        "rows": rows,
        "zero_shot": zero_shot,
        "extremes": extremes,
        "side_by_side": side_by_side,
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpu_cores": os.cpu_count(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
        "study_wall_time_s": time.time() - progress.study_start,
    }
    write_report(results, output_dir)
    failed = [row["name"] for row in rows if row["status"] != "ok"]
    progress.say(f"done in {format_duration(results['study_wall_time_s'])}: {output_dir / 'report.html'}"
                 + (f"; FAILED: {', '.join(failed)} (rerun to retry them)" if failed else ""))
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run_zero_shot(study: Study, output_dir: Path, clip, progress: StudyProgress) -> dict | None:
    if not study.zero_shot:
        return None
    from ...evaluation.jobs import run_zero_shot

    settings = study.zero_shot
    progress.say(f"zero-shot: {len(settings['templates'])} templates on {settings['images']}")
    clip_model = settings.get("clip_model") or clip or study.clip_model
    _, summary = run_zero_shot(settings["images"], settings["labels"], list(settings["templates"]),
                               output_dir / "zero_shot" / "zero_shot.json", labels_file=settings.get("labels_file"),
                               ensemble=bool(settings.get("ensemble", True)), clip_model=clip_model, progress=False)
    return {"accuracy": summary["accuracy"], "num_images": summary["num_images"],
            "clip_model": summary["clip_model"]}


def _extremes(study: Study, rows: list[dict], data: StudyData, output_dir: Path, progress: StudyProgress) -> dict:
    """The best and worst captions of one variant (the one the study names, else the best by CIDEr, or CLIPScore
    when the study computes no CIDEr), by CLIPScore when the study has a CLIP model, else by per-image CIDEr, each
    with its per-word attention maps. `load_study` made sure the metrics include one of the two. When this run has
    no such variant: `{"not_drawn": why}`, and the maps of an earlier run are deleted (`_no_extremes`)."""
    from ...evaluation.attention_maps import resolve_layers
    from ...evaluation.jobs import draw_extremes, load_captioner, rank_extremes, read_coco_references

    finished = [row for row in rows if row["status"] == "ok" and row["name"] != BASE_ROW]
    if not finished:
        return _no_extremes("no variant finished in this run", output_dir, progress)
    chosen = study.extremes.get("variant")
    row = next((r for r in finished if r["name"] == chosen), None) if chosen else max(
        finished, key=lambda r: r["metrics"].get("cider", r["metrics"].get("clip_score", float("-inf"))))
    if row is None:
        return _no_extremes(f"variant {chosen!r} (extremes.variant) did not finish in this run", output_dir,
                            progress)
    folder = output_dir / "variants" / row["name"]
    scores = read_json(folder / "scores.json")
    by = "clip_score" if "clip_score" in row["metrics"] else "cider"
    per_image = {name: values[by] for name, values in scores["per_image"].items()}
    top_k = min(study.extremes.get("top_k", 2), len(per_image))
    best, worst = rank_extremes(per_image, top_k)
    progress.say(f"extremes: best and worst {top_k} captions of {row['name']} by {metric_names()[by]}, with "
                 "attention maps")
    predictions = read_json(folder / "eval_predictions.json")
    file_names = read_coco_references(data.val_json).file_names
    model, processor = load_captioner(folder)
    image = {name: Path(data.val_images) / file_names[name] for name in best + worst}
    # the settings the variant's predictions were generated with
    *_, settings = parse_train_arguments({**RUN_DEFAULTS, **study.recipe, **data.arguments, **base_arguments(study.base),
                                     "output_dir": str(folder)})
    layers = resolve_layers(model.get_base_model() if hasattr(model, "get_base_model") else model,
                            study.extremes.get("layer"))
    drawn = draw_extremes(model, processor, [(name, image[name]) for name in best],
                          [(name, image[name]) for name in worst], output_dir / "extremes", layer=layers,
                          **settings.generation_settings(), progress=False)
    summary = {"variant": row["name"], "by": by, "layers": layers}
    for kind, entries in drawn.items():
        summary[kind] = [{"rank": entry["rank"], "name": entry["name"], "image": str(image[entry["name"]]),
                          "caption": predictions[entry["name"]], "attention_caption": entry["attention_caption"],
                          by: per_image[entry["name"]], "png": str(entry["png"].relative_to(output_dir))}
                         for entry in entries]
    write_json_atomic(output_dir / "extremes" / "extremes.json", summary)
    # The maps of an earlier run (another variant, a larger top_k) would sit beside these as if they were its own.
    drawn_now = {entry["png"].name for entries in drawn.values() for entry in entries}
    for kind in drawn:
        for stale in (output_dir / "extremes").glob(f"{kind}_*_attention.png"):
            if stale.name not in drawn_now:
                stale.unlink()
    return summary


def _no_extremes(reason: str, output_dir: Path, progress: StudyProgress) -> dict:
    """The maps of an earlier run would otherwise sit in `extremes/` beside this run's failures as if they were its
    own, though their variant may since have changed or failed."""
    folder = output_dir / "extremes"
    removed = folder.exists()
    if removed:
        shutil.rmtree(folder)
    progress.say(f"extremes: not drawn: {reason}" + (f"; deleted the earlier run's maps in {folder}" if removed else ""))
    return {"not_drawn": reason}


def _side_by_side(study: Study, rows: list[dict], data: StudyData, output_dir: Path) -> list[dict]:
    from ...evaluation.jobs import read_coco_references

    coco = read_coco_references(data.val_json)
    names = sorted(coco.references)[:study.side_by_side]
    captions = {}
    for row in rows:
        if row["status"] == "ok":
            captions[row["name"]] = read_json(
                output_dir / "variants" / row["name"] / "eval_predictions.json")
    return [{"name": name, "image": str(Path(data.val_images) / coco.file_names[name]),
             "references": coco.references[name],
             "captions": {variant: predictions[name] for variant, predictions in captions.items()}}
            for name in names]

