"""A train.py output folder read and checked before anything is uploaded: its results, its weights or its adapter
and that adapter's base, and the remote code `trust_remote_code=True` needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ...evaluation.metrics import metric_names
from ...inference.loading import adapter_base, check_model_folder
from ...utils.io import InvalidJSONError, read_json

__all__ = [
    "ADAPTER_FILES",
    "ATTENTION_EXAMPLE",
    "PROCESSOR_FILES",
    "RESULT_FILES",
    "TrainingOutput",
    "check_repo_id",
    "is_hub_id",
    "model_files",
    "present_files",
    "read_eval_results",
    "read_output",
    "read_required_json",
    "source_files",
]

ATTENTION_EXAMPLE = "attention_example.png"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
MODEL_SHARDS = "model-*-of-*.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
RESULT_FILES = (
    "eval_results.json",
    "training_summary.json",
    "train_results.json",
    "all_results.json",
    "eval_predictions.json",
)


@dataclass
class TrainingOutput:
    """What a train.py output folder holds, checked before anything is uploaded."""

    folder: Path
    summary: dict
    eval_results: dict
    adapter_config: dict | None  # None for a full model
    model_folder: Path | None  # config + weights: the folder itself for a full model, an adapter's local base
    base_repo: str | None  # an adapter's base when it is on the Hub

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None

    @property
    def method(self) -> str:
        return self.summary["peft_method"]


def read_output(output_dir: str | Path) -> TrainingOutput:
    """Reads and checks a train.py output folder: results, weights (or adapter and its base), remote code."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the --output_dir of a finished train.py run")
    summary = read_required_json(folder / "training_summary.json")
    if not isinstance(summary, dict):
        raise InvalidJSONError(f"{folder / 'training_summary.json'} must hold a JSON object, got "
                               f"{type(summary).__name__}: put back the file train.py wrote")
    eval_results = read_eval_results(folder / "eval_results.json")
    if not (folder / "adapter_config.json").is_file():
        check_publishable_model(folder)
        return TrainingOutput(folder, summary, eval_results, None, folder, None)

    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has adapter_config.json but no {name}: the adapter was not fully saved")
    check_remote_code(folder, "processor_config.json")
    adapter_config = read_required_json(folder / "adapter_config.json")
    base_folder, base_repo = locate_base(folder)
    if base_folder is not None:
        check_publishable_model(base_folder)
    return TrainingOutput(folder, summary, eval_results, adapter_config, base_folder, base_repo)


def read_required_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: give the output folder of a finished train.py run (it writes the model, "
            "eval_results.json and training_summary.json at the end)"
        )
    return read_json(path)


def read_eval_results(path: Path) -> dict:
    """eval_results.json checked before anything reaches the Hub: an object whose metrics are numbers, CIDEr among
    them (the card's model-index and the commit message lead with it). A hand-edited file is the usual culprit."""
    results = read_required_json(path)
    fix = "put back the value train.py wrote (all_results.json holds the same eval_ fields)"
    if not isinstance(results, dict):
        raise InvalidJSONError(f"{path} must hold a JSON object of metrics such as {{\"eval_cider\": 0.52}}, got "
                               f"{type(results).__name__}: {fix}")
    if "eval_cider" not in results:
        raise InvalidJSONError(f"{path} has no field 'eval_cider': {fix}")
    for name in [f"eval_{key}" for key in metric_names() if f"eval_{key}" in results]:  # those the card shows
        value = results[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidJSONError(f"{path}: field {name!r} must be a number, got {value!r}: {fix}")
    return results


def check_publishable_model(folder: Path) -> None:
    """A model folder others can load from the Hub without this package: complete (`check_model_folder`), its
    weights in safetensors (the files pushed), and the remote code its configs name."""
    check_model_folder(folder)
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors: save the model again with "
                                "save_pretrained, which writes it")
    check_remote_code(folder, "config.json")
    check_remote_code(folder, "processor_config.json")


def check_remote_code(folder: Path, config_name: str) -> None:
    """`trust_remote_code=True` needs the `auto_map` and every source file it names beside the weights."""
    path = folder / config_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: save the processor with the model (processor.save_pretrained)")
    auto_map = read_json(path).get("auto_map")
    if not auto_map:
        raise ValueError(
            f"{path} has no auto_map, so trust_remote_code=True could not load it without this package: save it "
            "again after `import modeling_vitgpt2`, which registers the classes for the Hub"
        )
    missing = sorted({reference.split(".")[0] + ".py" for reference in auto_map.values()} - set(source_files(folder)))
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}, which {config_name}'s auto_map names: save it again with "
            "save_pretrained (which copies the source files) after `import modeling_vitgpt2`"
        )


def locate_base(folder: Path) -> tuple[Path | None, str | None]:
    """(local base folder to upload, or the Hub id to refer to) for the adapter's base (`adapter_base`)."""
    base = adapter_base(folder)
    if Path(base).is_dir():
        return Path(base), None
    if is_hub_id(base):
        return None, base
    raise FileNotFoundError(
        f"the adapter's base model {base!r} (adapter_config.json: base_model_name_or_path) is neither a folder "
        "here nor a Hub id: put the base model folder back there, or set base_model_name_or_path to its Hub id"
    )


def present_files(folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    return {name: folder / name for name in names if (folder / name).is_file()}


def source_files(folder: Path) -> dict[str, Path]:
    # The configuration/modeling/processing files save_pretrained copied beside the weights.
    return {path.name: path for path in sorted(folder.glob("*.py"))}


def model_files(folder: Path) -> dict[str, Path]:
    files = present_files(folder, MODEL_FILES + PROCESSOR_FILES)
    files.update({path.name: path for path in sorted(folder.glob(MODEL_SHARDS))})
    files.update(source_files(folder))
    return files


def is_hub_id(name: str | None) -> bool:
    if not name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise ValueError(
            f"repo id {repo_id!r} must look like your-namespace/model-name (the card's usage snippets name it)"
        )
