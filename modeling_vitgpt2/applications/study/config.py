"""The study file: reading and checking a study YAML (`load_study`) before anything runs, and the built-in study
shipped as package data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ...evaluation.metrics import METRICS

__all__ = [
    "BASE_ROW",
    "BUILTIN_STUDY",
    "STUDY_KEYS",
    "Study",
    "StudyConfigError",
    "load_study",
]

# Package data (pyproject.toml), so that `vitgpt2 study` runs the built-in study from a wheel too.
BUILTIN_STUDY = Path(__file__).resolve().parents[1] / "studies" / "synthetic_peft.yaml"
BASE_ROW = "base"
STUDY_KEYS = {"name", "base", "data", "recipe", "variants", "clip_model", "clip_prefix", "metrics", "zero_shot",
              "extremes", "side_by_side", "output_dir", "torch_threads"}


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

