"""Run a whole PEFT study in one command and write one report: fine-tune a base captioner with several methods,
score every variant with the metric registry, compare CLIP prompt templates, and draw the best and worst captions'
attention maps.

    vitgpt2 study                                   # the built-in offline study (synthetic set)
    vitgpt2 study configs/studies/course_peft.yaml --output_dir outputs/course-study

A study is a YAML file (see `configs/studies/` and the built-in `studies/synthetic_peft.yaml` beside this module):

    name: my-study
    base: {model: outputs/synthetic-default, train_config: default}
          # or {model: <Hub id or folder>}, or {encoder: <timm name>, decoder: <GPT-2 id>}; train_config trains a
          # missing base folder first, into `model`: "default" is train.py's default job, else a train.py YAML
    data: {train_json: ..., train_images: ..., val_json: ..., val_images: ...}   # or synthetic_* options
    recipe: {learning_rate: 0.001, num_train_epochs: 3, ...}                     # any train.py argument
    variants:                                                                    # each: a name and overrides
      - {name: lora_r4, peft: lora, lora_rank: 4}
      - {name: full, peft: full}
    clip_model: openai/clip-vit-base-patch32      # optional: CLIPScore, extremes by CLIPScore, zero-shot
    metrics: [cider, bleu, rouge_l, meteor, clip_score, diversity, copied]      # optional: default all
    zero_shot: {images: p1_data/val, labels: p1_data/id2label.json, templates: [...], ensemble: true}
    torch_threads: 1                              # optional: CPU threads for torch (default: torch's choice)
    extremes: {variant: lora_r4, top_k: 2, layer: [2, 3]}   # default: the best variant by CIDEr, top 2, the
                                                  # report's 3rd-4th decoder layers (all layers if it has fewer)
    side_by_side: 4                               # validation images shown with every variant's caption

What it guarantees:
- Frozen-encoder variants share one encoder-feature cache (`<output_dir>/feature-cache`, keyed by the encoder's
  weights), so the encoder runs once per image for the whole study, base-model evaluation included.
- Resumable: each finished variant leaves `<output_dir>/variants/<name>/study_result.json` and is skipped on a rerun;
  an interrupted one resumes from its last complete checkpoint. A failing variant is reported with its error and the
  others still run; a rerun retries it.
- Every number in the report is `eval.py score` (`evaluation.score_predictions`) on that variant's saved
  predictions (`variants/<name>/eval_predictions.json`), written beside them as `scores.json`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import logging
import mimetypes
import os
import platform
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainerCallback

from ..evaluation.metrics import METRICS, format_metric, metric_names
from ..utils.errors import run_command
from ..utils.io import read_json, write_json_atomic, write_text_atomic

__all__ = [
    "BASE_ROW",
    "BUILTIN_STUDY",
    "ensure_base_model",
    "load_study",
    "main",
    "RESULT_FILE",
    "RUN_DEFAULTS",
    "run_study",
    "run_variant",
    "Study",
    "STUDY_KEYS",
    "StudyConfigError",
    "StudyData",
    "StudyProgress",
    "TABLE_METRICS",
    "write_report",
]


logger = logging.getLogger(__name__)

# Package data, so that `vitgpt2 study` runs the built-in study from a wheel too.
BUILTIN_STUDY = Path(__file__).resolve().parent / "studies" / "synthetic_peft.yaml"
RESULT_FILE = "study_result.json"
BASE_ROW = "base"
STUDY_KEYS = {"name", "base", "data", "recipe", "variants", "clip_model", "clip_prefix", "metrics", "zero_shot",
              "extremes", "side_by_side", "output_dir", "torch_threads"}
# The headline columns of the PEFT table (all registry values are in results.json / results.csv).
TABLE_METRICS = ("cider", "clip_score", "bleu_4", "rouge_l", "meteor")
# The data options that describe the built-in synthetic set, written once for the whole study.
SYNTHETIC_ARGUMENTS = ("synthetic_train_images", "synthetic_val_images", "synthetic_image_size", "synthetic_domain",
                       "synthetic_dir")
# The study prints its own progress lines, and logs to nothing unless the recipe says otherwise.
RUN_DEFAULTS = {"disable_tqdm": True, "report_to": "none"}


class StudyConfigError(ValueError):
    """A study file that cannot run; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------------------------
# The study file


@dataclass
class Study:
    path: Path
    name: str
    base: dict
    data: dict
    recipe: dict
    variants: list[tuple[str, dict]]
    clip_model: str | None = None
    clip_prefix: str = ""
    metrics: list[str] | None = None
    zero_shot: dict | None = None
    extremes: dict = field(default_factory=dict)
    side_by_side: int = 4
    output_dir: str | None = None
    torch_threads: int | None = None


def _argument_names() -> set[str]:
    from ..training.arguments import ARGUMENT_GROUPS

    return {f.name for group in ARGUMENT_GROUPS for f in fields(group) if f.init}


def load_study(path) -> Study:
    """Reads and checks a study file; every mistake is reported with the file and the field before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"study file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise StudyConfigError(f"study file {path} is not valid YAML: {error}") from None

    def fail(where: str, problem: str) -> StudyConfigError:
        return StudyConfigError(f"study file {path}: {where} {problem}")

    if not isinstance(content, dict):
        raise fail("the top level", "must be a mapping with base, variants, ...")
    unknown = sorted(set(content) - STUDY_KEYS)
    if unknown:
        raise fail(f"field(s) {unknown}", f"are not study fields; expected some of {sorted(STUDY_KEYS)}")
    arguments = _argument_names()
    sections = {}
    for section in ("base", "data", "recipe"):
        value = content.get(section) or {}
        if not isinstance(value, dict):
            raise fail(f"'{section}'", "must be a mapping")
        sections[section] = dict(value)
    base = sections["base"]
    if not (base.get("model") or (base.get("encoder") and base.get("decoder"))):
        raise fail("'base'", "needs 'model' (a folder or Hub id) or both 'encoder' and 'decoder'")
    if set(base) - {"model", "encoder", "decoder", "train_config"}:
        raise fail("'base'", f"has unknown keys {sorted(set(base) - {'model', 'encoder', 'decoder', 'train_config'})}")
    for section in ("data", "recipe"):
        wrong = sorted(set(sections[section]) - arguments)
        if wrong:
            raise fail(f"'{section}'", f"has keys that are not train.py arguments: {wrong} (see python train.py --help)")
    if sections["data"].get("dataset_name"):
        raise fail("'data.dataset_name'", "is not supported: a study re-scores predictions against COCO-style files "
                   "(train_json/val_json + image folders), or uses the built-in synthetic set")
    raw_variants = content.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise fail("'variants'", "must be a non-empty list of {name: ..., <train.py argument>: ...}")
    variants, seen = [], set()
    for index, variant in enumerate(raw_variants):
        where = f"variants[{index}]"
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
            raise fail(where, "must be a mapping with a 'name'")
        name = variant["name"]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name == BASE_ROW:
            raise fail(f"{where}.name", f"{name!r} must be a folder-safe name (letters, digits, _ . -), not 'base'")
        if name in seen:
            raise fail(f"{where}.name", f"{name!r} is used twice")
        seen.add(name)
        overrides = {key: value for key, value in variant.items() if key != "name"}
        wrong = sorted(set(overrides) - arguments)
        if wrong:
            raise fail(where, f"has keys that are not train.py arguments: {wrong} (see python train.py --help)")
        variants.append((name, overrides))
    metrics = content.get("metrics")
    if metrics is not None and (not isinstance(metrics, list) or set(metrics) - set(METRICS)):
        raise fail("'metrics'", f"must be a list of registered metrics: {', '.join(METRICS)}")
    zero_shot = content.get("zero_shot")
    if zero_shot is not None:
        if not isinstance(zero_shot, dict) or not all(zero_shot.get(key) for key in ("images", "labels", "templates")):
            raise fail("'zero_shot'", "needs images (folder), labels (id2label.json) and templates (a list)")
        if not (zero_shot.get("clip_model") or content.get("clip_model")):
            raise fail("'zero_shot'", "needs a CLIP model: set clip_model (top level or in zero_shot)")
    extremes = content.get("extremes") or {}
    if not isinstance(extremes, dict) or set(extremes) - {"variant", "top_k", "layer"}:
        raise fail("'extremes'", "must be a mapping with optional 'variant', 'top_k' and 'layer' (attention maps)")
    if extremes.get("variant") is not None and extremes["variant"] not in seen:
        raise fail("'extremes.variant'", f"{extremes['variant']!r} is not one of the variants {sorted(seen)}")
    side_by_side = content.get("side_by_side", 4)
    if not isinstance(side_by_side, int) or side_by_side < 0:
        raise fail("'side_by_side'", "must be a number of images (0 or more)")
    threads = content.get("torch_threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise fail("'torch_threads'", "must be a positive number of CPU threads")
    return Study(path=path, torch_threads=threads, name=str(content.get("name") or path.stem), base=base, data=sections["data"],
                 recipe=sections["recipe"], variants=variants, clip_model=content.get("clip_model"),
                 clip_prefix=content.get("clip_prefix") or "", metrics=metrics, zero_shot=zero_shot,
                 extremes=extremes, side_by_side=side_by_side, output_dir=content.get("output_dir"))


# ---------------------------------------------------------------------------------------------------------------
# Progress


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


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
                 f"elapsed {_duration(time.time() - self.study_start)}, "
                 f"left ~{'?' if left is None else _duration(left)}")


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


def _prepare_data(study: Study, output_dir: Path, progress: StudyProgress) -> StudyData:
    """The study's COCO-style files; the synthetic set is written once (a rewrite would change the files' times,
    and with them the feature cache's keys)."""
    from ..data.synthetic import write_synthetic_coco
    from ..training.arguments import DataArguments

    data = dict(study.data)
    synthetic = {key: data.pop(key) for key in SYNTHETIC_ARGUMENTS if key in data}
    if not data.get("train_json"):
        options = DataArguments(**synthetic).synthetic_options()
        root = Path(synthetic.get("synthetic_dir") or output_dir / "data")
        marker = root / "written.json"
        if not (marker.is_file() and read_json(marker) == options):
            progress.say(f"writing the synthetic {options['domain']!r} set ({options['num_train']} training and "
                         f"{options['num_val']} validation images) to {root}")
            write_synthetic_coco(root, **options)
            write_json_atomic(marker, options)
        data.update(train_json=str(root / "train.json"), train_images=str(root / "train"),
                    val_json=str(root / "val.json"), val_images=str(root / "val"))
    else:
        missing = [key for key in ("train_images", "val_json", "val_images") if not data.get(key)]
        if missing:
            raise StudyConfigError(f"study file {study.path}: 'data' needs {missing} with train_json")
    return StudyData(data["train_json"], data["train_images"], data["val_json"], data["val_images"], data)


def _parse_arguments(values: dict):
    from ..training.arguments import ARGUMENT_GROUPS

    parser = HfArgumentParser(ARGUMENT_GROUPS)
    return parser.parse_dict(values, allow_extra_keys=False)


def _base_arguments(study: Study) -> dict:
    if study.base.get("model"):
        return {"model_name_or_path": study.base["model"]}
    return {"encoder": study.base["encoder"], "decoder": study.base["decoder"]}


def ensure_base_model(study: Study, progress: StudyProgress) -> None:
    """Trains the base model first when its folder is missing and the study says how (`base.train_config`)."""
    from ..training.run import run_training

    model = study.base.get("model")
    train_config = study.base.get("train_config")
    if not model or not train_config or (Path(model) / "config.json").is_file():
        return
    if train_config == "default":
        values, source = {}, "train.py's default job"
    else:
        config_path = Path(train_config)
        if not config_path.is_file():
            raise StudyConfigError(f"study file {study.path}: base.train_config {train_config} not found")
        values, source = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}, str(config_path)
    progress.say(f"base model {model} not found: training it first ({source})")
    values["output_dir"] = model
    run_training(*_parse_arguments(values))


def _score(study: Study, folder: Path, data: StudyData, clip) -> dict:
    """`eval.py score` on the folder's saved predictions, written beside them as scores.json."""
    from ..evaluation.jobs import score_predictions

    report = score_predictions(folder / "eval_predictions.json", data.val_json, data.val_images,
                               clip_model=clip, clip_prefix=study.clip_prefix, train_annotations=data.train_json,
                               metrics=study.metrics, output=folder / "scores.json", progress=False)
    return {"metrics": report.metrics, "skipped": report.skipped}


def _evaluate_base(study: Study, data: StudyData, output_dir: Path, clip, progress: StudyProgress) -> dict:
    """The base model's scores on the study's validation set before any fine-tuning (the table's first row),
    captioned from the shared feature cache."""
    from ..data.captions import CaptionCollator, load_coco_captions, references_per_image
    from ..data.feature_cache import CachedFeatureCollator, EncoderFeatureCache
    from ..training.peft_methods import count_parameters
    from ..training.run import build_processor_and_model
    from ..training.trainer import CaptionTrainer

    folder = output_dir / "variants" / BASE_ROW
    finished = _finished(folder)
    if finished:
        progress.say("base model: already evaluated, skipped")
        return finished
    progress.say("evaluating the base model before fine-tuning")
    start = time.time()
    model_args, data_args, _, training_args = _parse_arguments(
        {**RUN_DEFAULTS, **study.recipe, **data.arguments, **_base_arguments(study), "output_dir": str(folder)})
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


def _best_epoch(log_history: list[dict]) -> float | None:
    evaluations = [entry for entry in log_history if "eval_cider" in entry and "epoch" in entry]
    if not evaluations:
        return None
    return max(evaluations, key=lambda entry: entry["eval_cider"])["epoch"]


def run_variant(study: Study, index: int, name: str, overrides: dict, data: StudyData, output_dir: Path, clip,
                progress: StudyProgress) -> dict:
    """Trains and scores one variant (or returns its earlier result); a failure is returned as a failed row."""
    from ..training.checkpoints import last_complete_checkpoint
    from ..training.run import run_training

    folder = output_dir / "variants" / name
    progress.start_variant(index, name)
    finished = _finished(folder)
    if finished:
        progress.say(f"variant {index}/{progress.total} {name}: already finished, skipped")
        return finished
    start = time.time()
    values = {**RUN_DEFAULTS, **study.recipe, **data.arguments,
              **_base_arguments(study), **overrides, "output_dir": str(folder)}
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
        run_training(*_parse_arguments(values), callbacks=[callback])
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
                     f" in {_duration(result['wall_time_s'])}")
    return result


def run_study(study: Study, output_dir, *, show_progress: bool = True) -> dict:
    """Runs (or resumes) every part of the study and writes the report; returns the results.json content."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if study.torch_threads:
        torch.set_num_threads(study.torch_threads)
    progress = StudyProgress(len(study.variants), enabled=show_progress)
    progress.say(f"study {study.name!r} ({study.path}) -> {output_dir}: {len(study.variants)} variants")
    ensure_base_model(study, progress)
    data = _prepare_data(study, output_dir, progress)
    clip = None
    if study.clip_model:
        from ..evaluation.clip_score import load_clip

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
    progress.say(f"done in {_duration(results['study_wall_time_s'])}: {output_dir / 'report.html'}"
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
    from ..evaluation.jobs import run_zero_shot

    settings = study.zero_shot
    progress.say(f"zero-shot: {len(settings['templates'])} templates on {settings['images']}")
    clip_model = settings.get("clip_model") or clip or study.clip_model
    _, summary = run_zero_shot(settings["images"], settings["labels"], list(settings["templates"]),
                               output_dir / "zero_shot" / "zero_shot.json", labels_file=settings.get("labels_file"),
                               ensemble=bool(settings.get("ensemble", True)), clip_model=clip_model, progress=False)
    return {"accuracy": summary["accuracy"], "num_images": summary["num_images"],
            "clip_model": summary["clip_model"]}


def _extremes(study: Study, rows: list[dict], data: StudyData, output_dir: Path,
              progress: StudyProgress) -> dict | None:
    """The best and worst captions of one variant, by CLIPScore when the study has a CLIP model, else by per-image
    CIDEr, each with its per-word attention maps."""
    from ..evaluation.attention_maps import REPORT_LAYERS, cross_attention_layers
    from ..evaluation.jobs import draw_extremes, load_captioner, rank_extremes, read_coco_references

    finished = [row for row in rows if row["status"] == "ok" and row["name"] != BASE_ROW]
    if not finished:
        return None
    chosen = study.extremes.get("variant")
    row = next((r for r in finished if r["name"] == chosen), None) if chosen else max(
        finished, key=lambda r: r["metrics"].get("cider", float("-inf")))
    if row is None:
        return None
    folder = output_dir / "variants" / row["name"]
    scores = read_json(folder / "scores.json")
    by = "clip_score" if "clip_score" in row["metrics"] else "cider"
    per_image = {name: values[by] for name, values in scores["per_image"].items()}
    top_k = min(int(study.extremes.get("top_k", 2)), len(per_image))
    best, worst = rank_extremes(per_image, top_k)
    progress.say(f"extremes: best and worst {top_k} captions of {row['name']} by {metric_names()[by]}, with "
                 "attention maps")
    predictions = read_json(folder / "eval_predictions.json")
    file_names = read_coco_references(data.val_json).file_names
    model, processor = load_captioner(folder)
    image = {name: Path(data.val_images) / file_names[name] for name in best + worst}
    # the settings the variant's predictions were generated with
    *_, settings = _parse_arguments({**RUN_DEFAULTS, **study.recipe, **data.arguments, **_base_arguments(study),
                                     "output_dir": str(folder)})
    layer = study.extremes.get("layer")
    if layer is None:  # the report's 3rd-4th layers where the model has them, else the mean of all
        available = cross_attention_layers(model.get_base_model() if hasattr(model, "get_base_model") else model)
        layer = list(REPORT_LAYERS) if set(REPORT_LAYERS) <= set(available) else "all"
    drawn = draw_extremes(model, processor, [(name, image[name]) for name in best],
                          [(name, image[name]) for name in worst], output_dir / "extremes", layer=layer,
                          **settings.generation_settings(), progress=False)
    summary = {"variant": row["name"], "by": by, "layers": layer}
    for kind, entries in drawn.items():
        summary[kind] = [{"rank": entry["rank"], "name": entry["name"], "image": str(image[entry["name"]]),
                          "caption": predictions[entry["name"]], "attention_caption": entry["attention_caption"],
                          by: per_image[entry["name"]], "png": str(entry["png"].relative_to(output_dir))}
                         for entry in entries]
    write_json_atomic(output_dir / "extremes" / "extremes.json", summary)
    return summary


def _side_by_side(study: Study, rows: list[dict], data: StudyData, output_dir: Path) -> list[dict]:
    from ..evaluation.jobs import read_coco_references

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


# ---------------------------------------------------------------------------------------------------------------
# The report


def _table_rows(results: dict) -> tuple[list[str], list[dict]]:
    """The PEFT table's columns (only metrics some row has) and one dict of display strings per row."""
    names = metric_names()
    present = [key for key in TABLE_METRICS if any(key in row.get("metrics", {}) for row in results["rows"])]
    table = []
    for row in results["rows"]:
        ok = row["status"] == "ok"
        total = row.get("total_parameters") or 0
        trainable = row.get("trainable_parameters")
        peak = row.get("peak_memory_bytes")
        cells = {
            "Variant": row["name"],
            "Settings": ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "-",
            "Trainable": f"{trainable:,}" if ok else "-",
            "Trainable %": f"{100 * trainable / total:.3f}" if ok and total else "-",
        }
        for key in present:
            value = row.get("metrics", {}).get(key)
            cells[names[key]] = format_metric(key, value) if value is not None else "-"
        cells["Train time"] = _duration(row["train_runtime_s"]) if ok and row.get("train_runtime_s") else "-"
        cells["Peak memory"] = f"{peak / 2 ** 20:,.0f} MiB" if peak else "-"
        cells["Best epoch"] = f"{row['best_epoch']:g}" if row.get("best_epoch") is not None else "-"
        cells["Status"] = "ok" if ok else f"FAILED: {row['error']}"
        table.append(cells)
    return [names[key] for key in present], table


def _figures(results: dict, output_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir = output_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for row in results["rows"] if row["status"] == "ok"]
    variants = [row for row in rows if row["name"] != BASE_ROW]
    base = next((row for row in rows if row["name"] == BASE_ROW), None)
    written = {}

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in variants:
        axis.scatter(row["trainable_parameters"], row["metrics"].get("cider", 0), s=40)
        axis.annotate(row["name"], (row["trainable_parameters"], row["metrics"].get("cider", 0)),
                      textcoords="offset points", xytext=(5, 4), fontsize=8)
    if base:
        axis.axhline(base["metrics"].get("cider", 0), color="grey", linestyle="--", label="base, before fine-tuning")
        axis.legend(fontsize=8)
    axis.set_xscale("log")
    axis.set(xlabel="trainable parameters (log scale)", ylabel="CIDEr", title="CIDEr against trainable parameters")
    written["cider_vs_parameters"] = _save_figure(figure, figures_dir / "cider_vs_parameters.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in variants:
        points = [(entry["epoch"], entry["eval_cider"]) for entry in row["log_history"] if "eval_cider" in entry]
        if points:
            axis.plot(*zip(*points), marker="o", label=row["name"])
    if base:
        axis.axhline(base["metrics"].get("cider", 0), color="grey", linestyle="--", label="base")
    axis.set(xlabel="epoch", ylabel="validation CIDEr", title="Validation CIDEr per epoch")
    axis.legend(fontsize=8)
    written["val_cider_per_epoch"] = _save_figure(figure, figures_dir / "val_cider_per_epoch.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in variants:
        points = [(entry["step"], entry["loss"]) for entry in row["log_history"] if "loss" in entry]
        if points:
            axis.plot(*zip(*points), label=row["name"])
    axis.set(xlabel="step", ylabel="training loss", title="Training loss per step")
    axis.legend(fontsize=8)
    written["train_loss"] = _save_figure(figure, figures_dir / "train_loss.png")
    return written


def _save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    temporary.replace(path)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def _results_csv(results: dict, output_dir: Path) -> None:
    keys = list(metric_names())
    header = ["variant", "status", "settings", "method", "trainable_parameters", "total_parameters",
              "trainable_percent", *keys, "train_runtime_s", "peak_memory_bytes", "best_epoch", "error"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in results["rows"]:
        total = row.get("total_parameters")
        trainable = row.get("trainable_parameters")
        metrics = row.get("metrics", {})
        writer.writerow([row["name"], row["status"], json.dumps(row["settings"]), row.get("method", ""),
                         trainable if trainable is not None else "", total or "",
                         100 * trainable / total if total and trainable is not None else "",
                         *[metrics.get(key, "") for key in keys], row.get("train_runtime_s", ""),
                         row.get("peak_memory_bytes") or "", row.get("best_epoch", ""), row.get("error", "")])
    write_text_atomic(output_dir / "results.csv", buffer.getvalue())


def _markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "")).replace("|", "\\|") for column in columns) + " |")
    return "\n".join(lines)


def write_report(results: dict, output_dir) -> None:
    """Writes results.json, results.csv, report.md (figures beside it) and a self-contained report.html."""
    output_dir = Path(output_dir)
    figures = _figures(results, output_dir)
    metric_columns, table = _table_rows(results)
    columns = ["Variant", "Settings", "Trainable", "Trainable %", *metric_columns, "Train time", "Peak memory",
               "Best epoch", "Status"]
    images_dir = output_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for entry in results["side_by_side"]:
        copy = images_dir / Path(entry["image"]).name
        shutil.copyfile(entry["image"], copy)
        entry["report_image"] = str(copy.relative_to(output_dir))

    names = metric_names()
    ok_rows = [row for row in results["rows"] if row["status"] == "ok"]
    peak_kind = next((row["peak_memory_kind"] for row in ok_rows if row.get("peak_memory_kind")), "")
    skipped = sorted({f"{name}: {reason}" for row in ok_rows for name, reason in row.get("skipped", {}).items()})
    sections: list[tuple[str, list]] = []  # (title, [("md", text) | ("img", path, alt) | ("table", cols, rows)])
    intro = (f"Study `{results['study']}` from `{results['study_file']}`; {len(results['rows']) - 1} variants, "
             f"wall time {_duration(results['study_wall_time_s'])} on {results['machine']['processor']} "
             f"({results['machine']['cpu_cores']} cores, {results['machine']['cpu_threads']} torch threads"
             + (f", {results['machine']['gpu']}" if results["machine"]["gpu"] else ", no GPU")
             + (f", load average {results['machine']['load_average'][0]:.1f} at the end"
                if results["machine"].get("load_average") else "") + "). "
             "Every score below is `eval.py score` on the variant's saved predictions "
             "(`variants/<name>/eval_predictions.json`, scores in `variants/<name>/scores.json`).")
    sections.append(("PEFT methods", [
        ("md", intro),
        ("table", columns, table),
        ("md", "The first row is the base model before fine-tuning. Trainable % is of all parameters; "
               f"peak memory is the {peak_kind}. All metrics of every row: `results.csv`, `results.json`."
               + (" Not computed: " + "; ".join(skipped) if skipped else "")),
        ("img", figures["cider_vs_parameters"], "CIDEr against trainable parameters"),
        ("img", figures["val_cider_per_epoch"], "Validation CIDEr per epoch"),
        ("img", figures["train_loss"], "Training loss per step"),
    ]))
    zero_shot = results.get("zero_shot")
    if zero_shot:
        zs_rows = [{"Template": template, "Accuracy": f"{accuracy:.4f}"}
                   for template, accuracy in zero_shot["accuracy"].items()]
        sections.append(("CLIP zero-shot prompt templates", [
            ("md", f"{zero_shot['num_images']} images, CLIP `{zero_shot['clip_model']}`; the ensemble averages the "
                   "templates' text embeddings."),
            ("table", ["Template", "Accuracy"], zs_rows)]))
    else:
        sections.append(("CLIP zero-shot prompt templates", [
            ("md", "Not part of this study (add a `zero_shot` section and a `clip_model`).")]))
    extremes = results.get("extremes")
    if extremes:
        by = names[extremes["by"]]
        items: list = [("md", f"Variant `{extremes['variant']}`, ranked by per-image {by}"
                              + ("" if extremes["by"] == "clip_score" else " (no CLIP model in this study)") + ".")]
        for kind in ("best", "worst"):
            for entry in extremes[kind]:
                note = "" if entry["attention_caption"] == entry["caption"] else (
                    f" (maps drawn for the re-generated caption \"{entry['attention_caption']}\")")
                items.append(("md", f"**{kind} {entry['rank']}** `{entry['name']}`, {by} "
                                    f"{format_metric(extremes['by'], entry[extremes['by']])}: "
                                    f"\"{entry['caption']}\"{note}"))
                items.append(("img", output_dir / entry["png"], f"{kind} {entry['rank']} attention maps"))
        sections.append((f"Best and worst captions by {by}, with per-word attention maps", items))
    if results["side_by_side"]:
        variant_names = [row["name"] for row in ok_rows]
        items = []
        for entry in results["side_by_side"]:
            items.append(("img", output_dir / entry["report_image"], entry["name"]))
            items.append(("table", ["Source", "Caption"],
                          [{"Source": name, "Caption": entry["captions"].get(name, "")} for name in variant_names]
                          + [{"Source": f"reference {i}", "Caption": ref}
                             for i, ref in enumerate(entry["references"], 1)]))
        sections.append(("Validation images: every variant's caption and the references", items))

    write_json_atomic(output_dir / "results.json", results)
    _results_csv(results, output_dir)
    write_text_atomic(output_dir / "report.md", _render_markdown(results, sections, output_dir))
    write_text_atomic(output_dir / "report.html", _render_html(results, sections))


def _render_markdown(results: dict, sections: list, output_dir: Path) -> str:
    parts = [f"# Study report: {results['study']}"]
    for title, items in sections:
        parts.append(f"## {title}")
        for item in items:
            if item[0] == "md":
                parts.append(item[1])
            elif item[0] == "img":
                parts.append(f"![{item[2]}]({Path(item[1]).relative_to(output_dir).as_posix()})")
            else:
                parts.append(_markdown_table(item[1], item[2]))
    return "\n\n".join(parts) + "\n"


def _render_html(results: dict, sections: list) -> str:
    from html import escape

    def inline(text: str) -> str:
        text = escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    def data_uri(path: Path) -> str:
        kind = mimetypes.guess_type(str(path))[0] or "image/png"
        return f"data:{kind};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"

    body = [f"<h1>Study report: {escape(results['study'])}</h1>"]
    for title, items in sections:
        body.append(f"<h2>{escape(title)}</h2>")
        for item in items:
            if item[0] == "md":
                body.append(f"<p>{inline(item[1])}</p>")
            elif item[0] == "img":
                body.append(f'<img src="{data_uri(item[1])}" alt="{escape(item[2])}">')
            else:
                head = "".join(f"<th>{escape(column)}</th>" for column in item[1])
                rows = "".join("<tr>" + "".join(f"<td>{escape(str(row.get(column, '')))}</td>" for column in item[1])
                               + "</tr>" for row in item[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0;"
             "image-rendering:auto}code{background:#f3f3f3;padding:0 3px}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Study report: {escape(results['study'])}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None, prog: str = "vitgpt2 study") -> int:
    """Runs a study; the exit status: 0, 1 when a variant failed (the report says which), 2 for a bad study file."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", help=f"study YAML (default: the built-in {BUILTIN_STUDY.name})")
    parser.add_argument("--output_dir", help="where variants, caches and the report go (default: the study's "
                                             "output_dir, else outputs/study-<name>)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def run() -> int:
        study = load_study(args.study or BUILTIN_STUDY)
        output_dir = args.output_dir or study.output_dir or f"outputs/study-{study.name}"
        results = run_study(study, output_dir, show_progress=not args.quiet)
        return 0 if all(row["status"] == "ok" for row in results["rows"]) else 1

    return run_command(prog, run)


if __name__ == "__main__":
    sys.exit(main(prog="python -m modeling_vitgpt2.applications.study"))
