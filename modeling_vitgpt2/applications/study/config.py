"""The study file: reading and checking a study YAML (`load_study`) before anything runs, and the built-in study
shipped as package data."""

from __future__ import annotations

import re
from argparse import ArgumentError
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ...evaluation.metrics import METRICS

__all__ = [
    "BASE_ROW",
    "BUILTIN_STUDY",
    "RUN_DEFAULTS",
    "STUDY_KEYS",
    "Study",
    "StudyConfigError",
    "base_arguments",
    "load_study",
]

# Package data (pyproject.toml), so that `vitgpt2 study` runs the built-in study from a wheel too.
BUILTIN_STUDY = Path(__file__).resolve().parents[1] / "studies" / "synthetic_peft.yaml"
BASE_ROW = "base"
STUDY_KEYS = {"name", "base", "data", "recipe", "variants", "clip_model", "clip_prefix", "metrics", "zero_shot",
              "extremes", "side_by_side", "output_dir", "torch_threads"}
ZERO_SHOT_KEYS = {"images", "labels", "labels_file", "templates", "ensemble", "clip_model"}
# The study prints its own progress lines, and logs to nothing unless the recipe says otherwise.
RUN_DEFAULTS = {"disable_tqdm": True, "report_to": "none"}
# train.py arguments the study sets for each row itself (its folder, its own last checkpoint): in a recipe or a
# variant they would be silently overwritten.
SET_BY_THE_STUDY = ("output_dir", "resume_from_checkpoint")


class StudyConfigError(ValueError):
    """A study file that cannot run; the message names the file and the field."""


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
    from ...training.arguments import ARGUMENT_GROUPS

    return {f.name for group in ARGUMENT_GROUPS for f in fields(group) if f.init}


def _folder_safe(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None


def _whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true/false are ints to Python


def base_arguments(base: dict) -> dict:
    """The train.py arguments that name the study's base model."""
    if base.get("model"):
        return {"model_name_or_path": base["model"]}
    return {"encoder": base["encoder"], "decoder": base["decoder"]}


def load_study(path) -> Study:
    """Reads and checks a study file; every mistake is reported with the file and the field before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"study file not found: {path}")
    from ...training.arguments import ConfigLoader  # recipe and variant values read as train.py's config files

    try:
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=ConfigLoader)
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
    _check_base_train_config(base, fail)
    for section in ("data", "recipe"):
        wrong = sorted(set(sections[section]) - arguments)
        if wrong:
            raise fail(f"'{section}'", f"has keys that are not train.py arguments: {wrong} (see python train.py --help)")
        for key in SET_BY_THE_STUDY:
            if key in sections[section]:
                raise fail(f"'{section}.{key}'", "is set by the study for each row (variants/<name> in its output "
                                                 "folder): remove it")
    if sections["data"].get("dataset_name"):
        raise fail("'data.dataset_name'", "is not supported: a study re-scores predictions against COCO-style files "
                   "(train_json/val_json + image folders), or uses the built-in synthetic set")
    raw_variants = content.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise fail("'variants'", "must be a non-empty list of {name: ..., <train.py argument>: ...}")
    study_name = content.get("name")
    if study_name is not None and not (isinstance(study_name, str) and _folder_safe(study_name)):
        # It names the default output folder (outputs/study-<name>): a path there would write the study elsewhere.
        raise fail("'name'", f"{study_name!r} must be a folder-safe name (letters, digits, _ . -)")
    variants, seen = [], set()
    for index, variant in enumerate(raw_variants):
        where = f"variants[{index}]"
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
            raise fail(where, "must be a mapping with a 'name'")
        name = variant["name"]
        # Compared without case: each names a folder, and on macOS and Windows `LoRA/` and `lora/` are one folder,
        # where the two variants would delete each other's results on every run.
        if not _folder_safe(name) or name.casefold() == BASE_ROW:
            raise fail(f"{where}.name", f"{name!r} must be a folder-safe name (letters, digits, _ . -), not 'base'")
        if name.casefold() in seen:
            raise fail(f"{where}.name", f"{name!r} is used twice (names are compared without case: each names a "
                                        "folder)")
        seen.add(name.casefold())
        overrides = {key: value for key, value in variant.items() if key != "name"}
        wrong = sorted(set(overrides) - arguments)
        if wrong:
            raise fail(where, f"has keys that are not train.py arguments: {wrong} (see python train.py --help)")
        for key in SET_BY_THE_STUDY:
            if key in overrides:
                raise fail(f"{where}.{key}", "is set by the study for each row (variants/<name> in its output "
                                             "folder): remove it")
        variants.append((name, overrides))
    _check_train_arguments(sections, variants, fail)
    for key in ("clip_model", "clip_prefix", "output_dir"):
        if content.get(key) is not None and not isinstance(content[key], str):
            raise fail(f"'{key}'", f"must be a string, not {content[key]!r}")
    metrics = content.get("metrics")
    if metrics is not None and not (isinstance(metrics, list)
                                    and all(isinstance(metric, str) and metric in METRICS for metric in metrics)):
        raise fail("'metrics'", f"must be a list of registered metrics: {', '.join(METRICS)}")
    # `run._extremes` ranks the best and worst captions by per-image CLIPScore, or CIDEr without a CLIP model.
    ranked_by = {"cider", "clip_score"} if content.get("clip_model") else {"cider"}
    if metrics is not None and not ranked_by & set(metrics):
        raise fail("'metrics'", "must include cider, or clip_score with a clip_model: the best and worst captions "
                                "are ranked by one of them")
    zero_shot = content.get("zero_shot")
    if zero_shot is not None:
        _check_zero_shot(zero_shot, content.get("clip_model"), fail)
    extremes = content.get("extremes") or {}
    if not isinstance(extremes, dict) or set(extremes) - {"variant", "top_k", "layer"}:
        raise fail("'extremes'", "must be a mapping with optional 'variant', 'top_k' and 'layer' (attention maps)")
    # It names a row: compared with case, unlike the folders (`run._extremes` finds the row by its exact name).
    names = [name for name, _ in variants]
    if extremes.get("variant") is not None and extremes["variant"] not in names:
        raise fail("'extremes.variant'", f"{extremes['variant']!r} is not one of the variants {sorted(names)}")
    top_k = extremes.get("top_k", 2)
    if not _whole_number(top_k) or top_k < 1:
        raise fail("'extremes.top_k'", f"must be a number of images (1 or more), not {top_k!r}")
    # What `evaluation.attention_maps.resolve_layers` takes; whether the model has those layers shows when it loads.
    layer = extremes.get("layer")
    layers = layer if isinstance(layer, list) else [layer]
    if layer not in (None, "all") and not (layers and all(_whole_number(i) and i >= 0 for i in layers)):
        raise fail("'extremes.layer'", f"must be a decoder layer (0-based), a list of them or 'all', not {layer!r}")
    side_by_side = content.get("side_by_side", 4)
    if not _whole_number(side_by_side) or side_by_side < 0:
        raise fail("'side_by_side'", "must be a number of images (0 or more)")
    threads = content.get("torch_threads")
    if threads is not None and (not _whole_number(threads) or threads < 1):
        raise fail("'torch_threads'", "must be a positive number of CPU threads")
    return Study(path=path, torch_threads=threads, name=str(content.get("name") or path.stem), base=base, data=sections["data"],
                 recipe=sections["recipe"], variants=variants, clip_model=content.get("clip_model"),
                 clip_prefix=content.get("clip_prefix") or "", metrics=metrics, zero_shot=zero_shot,
                 extremes=extremes, side_by_side=side_by_side, output_dir=content.get("output_dir"))


def _check_base_train_config(base: dict, fail) -> None:
    """A missing base model is trained first (`run.ensure_base_model`) from `train_config`: its file is read and
    parsed as train.py reads it, now rather than when the study starts."""
    train_config, model = base.get("train_config"), base.get("model")
    if train_config is None or train_config == "default" or (model and (Path(model) / "config.json").is_file()):
        return
    if not isinstance(train_config, str):
        raise fail("'base.train_config'", "must be 'default' (train.py's default job) or a train.py YAML file")
    from ...training.arguments import parse_train_arguments, read_config_file

    try:
        parse_train_arguments({**read_config_file(Path(train_config)), "output_dir": model}, exit_on_error=False)
    except (ArgumentError, OSError, ValueError, TypeError) as error:
        raise fail("'base.train_config'", f"{train_config}: {error}") from None


def _check_train_arguments(sections: dict, variants: list[tuple[str, dict]], fail) -> None:
    """Parses each row's train.py arguments (the base model's, then every variant's) as the study will when it runs
    the row, so that a value train.py would refuse stops the study before anything trains."""
    from ...training.arguments import parse_train_arguments
    from ...training.peft_methods import peft_method

    def field_name(key: str, where: str, overrides: dict) -> str:
        section = where if key in overrides else "data" if key in sections["data"] else "recipe"
        return f"{section}.{key}"

    base_row = {**RUN_DEFAULTS, **sections["recipe"], **sections["data"], **base_arguments(sections["base"])}
    rows = [("'recipe' with 'data' and 'base'", "", {})]
    rows += [(f"variants[{index}] ({name}) with the recipe", f"variants[{index}]", overrides)
             for index, (name, overrides) in enumerate(variants)]
    for row, where, overrides in rows:
        values = {**base_row, **overrides}
        if values.get("peft") is not None:  # checked by the registry here too: its error then names the field
            try:
                peft_method(str(values["peft"]))
            except ValueError as error:
                raise fail(field_name("peft", where, overrides), str(error)) from None
        try:
            parse_train_arguments(values, exit_on_error=False)
        except ArgumentError as error:
            key = error.argument_name.split("/")[0].removeprefix("--")
            raise fail(field_name(key, where, overrides),
                       f"has {error.message} (it takes what `train.py --{key}` takes; see train.py --help)") from None
        except (ValueError, TypeError) as error:  # the argument classes' own checks, e.g. strategies that disagree
            raise fail(row, f"does not make train.py arguments that work: {error}") from None


def _check_zero_shot(zero_shot, clip_model: str | None, fail) -> None:
    from ...evaluation.zero_shot import validate_templates

    if not isinstance(zero_shot, dict) or not all(zero_shot.get(key) for key in ("images", "labels", "templates")):
        raise fail("'zero_shot'", "needs images (folder), labels (id2label.json) and templates (a list)")
    unknown = sorted(set(zero_shot) - ZERO_SHOT_KEYS)
    if unknown:
        raise fail("'zero_shot'", f"has unknown keys {unknown}; expected some of {sorted(ZERO_SHOT_KEYS)}")
    if not (zero_shot.get("clip_model") or clip_model):
        raise fail("'zero_shot'", "needs a CLIP model: set clip_model (top level or in zero_shot)")
    try:
        validate_templates(zero_shot["templates"])
    except (TypeError, ValueError) as error:
        raise fail("'zero_shot.templates'", str(error)) from None
    if not isinstance(zero_shot.get("ensemble", True), bool):
        raise fail("'zero_shot.ensemble'", "must be true or false")
    # Relative paths are read from the folder the study runs in, like the data's and the base model's.
    for key, kind, exists in (("images", "folder", Path.is_dir), ("labels", "file", Path.is_file),
                              ("labels_file", "file", Path.is_file)):
        value = zero_shot.get(key)
        if value is not None and not (isinstance(value, str) and exists(Path(value))):
            raise fail(f"'zero_shot.{key}'", f"{value} is not a {kind} (relative paths are read from the folder the "
                                             "study runs in)")
