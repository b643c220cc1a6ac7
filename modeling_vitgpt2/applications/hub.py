"""Publishing a `train.py` output folder to the Hugging Face Hub: a model card rendered from the run's results, and
one commit holding what loading the model needs.

    python -m modeling_vitgpt2.applications.hub card outputs/lora                             # print the card
    python -m modeling_vitgpt2.applications.hub push outputs/lora --repo_id you/vitgpt2-lora  # [--private] [--include_checkpoints]
    python train.py ... --push_to_hub --hub_model_id you/vitgpt2-lora            # the same push, after training
    python -m modeling_vitgpt2.applications.hub space you/vitgpt2-lora --repo_id you/vitgpt2-demo  # the demo page as a Space

What goes up:
- full runs: config.json (with `auto_map`), the weights, generation_config.json, the configuration/modeling/processing
  source files that `save_pretrained` copied (so `trust_remote_code=True` works without this package), the processor;
- PEFT runs: adapter_config.json, adapter_model.safetensors, the processor (with its source file). An adapter's base
  that exists only on this machine (the `base_model/` folder a run writes when it builds its base, or any other local
  folder) is uploaded inside the repository as `base_model/`, with its own code, and the uploaded adapter_config.json
  names the repository instead of the local path; a base that is already on the Hub is only referred to;
- always: the rendered card as README.md (never peft's generic one), eval_results.json, training_summary.json,
  train_results.json, all_results.json, eval_predictions.json, and attention_example.png when the folder has one;
- never optimizer/scheduler/RNG states, trainer_state.json or checkpoint-* folders, unless `include_checkpoints`.

The upload is one `HfApi.create_commit` made of `CommitOperationAdd`s, rather than `upload_folder` of a staging copy:
every file is read from where it lies (no second copy of gigabytes of weights on disk), the two generated files (the
card and a rewritten adapter_config.json) are passed as bytes, so the output folder is never written to, and the list
of operations is exactly what lands in the repository. Files already in the repository and not in this push stay.

A Space (`push_space`) is one commit too: `app.py` (the demo page, `modeling_vitgpt2/applications/demo.py`), this package's source
under `modeling_vitgpt2/`, a `requirements.txt` pinning every dependency to the version installed here (the tested
one; Gradio is pinned by the README's `sdk_version`), and a README whose Space metadata names the model repository
(`models:`), which the page loads. A local output folder instead goes up inside the Space, as `model/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import sys
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import httpx2
import timm
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    SpaceCard,
    SpaceCardData,
    get_token,
)
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..evaluation.metrics import format_metric, metric_names
from ..inference.loading import BASE_MODEL_FOLDER, adapter_base, check_model_folder
from ..training.peft_methods import peft_method
from ..utils.errors import UserError, run_command
from ..utils.io import read_json

__all__ = [
    "HubPushError",
    "build_model_card",
    "check_push_settings",
    "push_space",
    "push_to_hub",
    "push_training_output",
    "refuse_files_with_token",
    "require_hub_token",
    "without_trainer_push",
]


# Package data, so that wheel installs render cards too; `model_card/template.md` at the top of the checkout is a
# link to this file, the one copy people edit.
TEMPLATE_RESOURCE = "model_card_template.md"
ATTENTION_EXAMPLE = "attention_example.png"
DISTRIBUTION = "modeling-vitgpt2"
# Where `push_space` puts a model pushed from a local folder; the page loads it from there.
SPACE_MODEL_FOLDER = "model"
SPACE_APP = '''"""The demo page of modeling-vitgpt2 (modeling_vitgpt2/applications/demo.py)."""

import sys

from modeling_vitgpt2.applications.demo import main

sys.exit(main())
'''
SPACE_README = """---
{{ card_data }}
---

# {{ title }}

Upload an image: {{ model_link }} captions it with beam search (every beam with its score), and each word of the
caption shows where in the image the decoder's cross-attention looked while writing it (choose the decoder layers
and the head; click a panel to see it large).

The page is `app.py` of modeling-vitgpt2, whose source is in `modeling_vitgpt2/` here; `requirements.txt` pins the
versions it was tested with, and the Gradio version is {{ gradio_version }}. To run it on your machine:

```bash
pip install -r requirements.txt gradio=={{ gradio_version }} && python app.py
```
"""

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

TOKEN_HELP = (
    "log in with `hf auth login`, or set HF_TOKEN to a write token from https://huggingface.co/settings/tokens"
)


class HubPushError(UserError, RuntimeError):
    """The push could not happen or the Hub refused it; the message says what to do next. Nothing local changed."""


def build_model_card(
    output_dir: str | Path,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    license: str = "apache-2.0",
    base_models: list[str] | None = None,
    template_path: str | Path | None = None,
    space_id: str | None = None,
) -> ModelCard:
    """The model card of a train.py output folder: metadata (library, pipeline, base models, datasets, tags,
    license) with a `model-index` of its CIDEr (and CLIPScore), then architecture, method, hyperparameters, data,
    usage, attention picture and limitations.

    repo_id: the repository the snippets load from (`namespace/name`); a placeholder when not given.
    dataset_name: the Hub id of the training/validation data; default: the one the run recorded, if any.
    base_models: Hub ids of what the model was built from; default: an adapter's Hub base, or the encoder, decoder or
        model the run recorded (never a local path).
    template_path: a Jinja card template of your own; default: the packaged `model_card/template.md`.
    space_id: a Space running the demo page for this model (`push_space`); the card links it.
    """
    return _render_card(_read_output(output_dir), repo_id, dataset_name, license, base_models, template_path,
                        space_id)


def require_hub_token(token: str | None = None) -> str:
    """The token to push with: the one given, else `HF_TOKEN`, else the one `hf auth login` stored."""
    token = token or get_token()
    if not token:
        raise HubPushError(f"No Hugging Face token found, so nothing can be pushed: {TOKEN_HELP}.")
    return token


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    include_checkpoints: bool = False,
    commit_message: str | None = None,
    dataset_name: str | None = None,
    license: str = "apache-2.0",
    base_models: list[str] | None = None,
    space_id: str | None = None,
) -> CommitInfo:
    """Creates `repo_id` if needed and uploads the output folder with its rendered card in one commit.

    The folder is only read. `private` applies when the repository is created; an existing repository keeps its
    visibility. Returns the commit (`.commit_url`). Raises `HubPushError` without a token or when the Hub refuses.
    """
    _check_repo_id(repo_id)
    token = require_hub_token(token)
    output = _read_output(output_dir)
    card = _render_card(output, repo_id, dataset_name, license, base_models, None, space_id)
    operations = _upload_operations(output, repo_id, card, include_checkpoints)
    refuse_files_with_token(operations, token)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or _default_commit_message(output, repo_id),
        )
    except HfHubHTTPError as error:
        raise HubPushError(
            f"The Hub refused the push to {repo_id}: {error}\nNo commit was made and {output.folder} is unchanged. "
            f"Check that your token can write to {repo_id.split('/')[0]} (`hf auth whoami`); {TOKEN_HELP}; then "
            "push again."
        ) from error
    except (httpx2.HTTPError, OSError) as error:  # no network, or the Hub unreachable (OfflineModeIsEnabled too)
        raise HubPushError(
            f"Could not reach the Hub to push to {repo_id} ({type(error).__name__}: {error}); no commit was made and "
            f"{output.folder} is unchanged. Check the network (and HF_ENDPOINT, HF_HUB_OFFLINE), then push again."
        ) from error


def push_space(
    model: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    license: str = "apache-2.0",
    commit_message: str | None = None,
) -> CommitInfo:
    """Creates the Gradio Space `repo_id` if needed and pushes the demo page for `model` in one commit.

    model: a model repository on the Hub (the Space's README names it and the page loads it from there), or a
        train.py output folder (uploaded into the Space as `model/`, with its card).
    Raises `HubPushError` without a token or when the Hub refuses; `ValueError` for a bad repo id or a model that
    is neither. Gradio must be installed: the Space is pinned to its version here, the one the page is tested with.
    """
    _check_repo_id(repo_id)
    token = require_hub_token(token)
    operations = _space_operations(model, repo_id, license)
    refuse_files_with_token(operations, token)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        return api.create_commit(
            repo_id=repo_id,
            repo_type="space",
            operations=operations,
            commit_message=commit_message or f"Demo page for {model}",
        )
    except HfHubHTTPError as error:
        raise HubPushError(
            f"The Hub refused the push to the Space {repo_id}: {error}\nNo commit was made. Check that your token "
            f"can write to {repo_id.split('/')[0]} (`hf auth whoami`); {TOKEN_HELP}; then push again."
        ) from error


def space_requirements() -> str:
    """requirements.txt for a Space: this package's dependencies, each pinned to the version installed here."""
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise HubPushError(f"{DISTRIBUTION} is not installed, so its dependencies are unknown: pip install -e .") \
            from None
    names = [Requirement(line).name for line in declared if Requirement(line).marker is None]  # extras have markers
    return "".join(f"{name}=={metadata.version(name)}\n" for name in names)


def _space_operations(model: str | Path, repo_id: str, license: str) -> list[CommitOperationAdd]:
    try:
        gradio_version = metadata.version("gradio")
    except metadata.PackageNotFoundError:
        raise HubPushError("Gradio is not installed: pip install -e \".[demo]\"; the Space is pinned to the Gradio "
                           "version the page is tested with here") from None
    files: dict[str, str | bytes] = {"app.py": SPACE_APP.encode(), "requirements.txt": space_requirements().encode()}
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".md", ".yaml") and "__pycache__" not in path.parts:
            files[f"{package.name}/{path.relative_to(package).as_posix()}"] = str(path)

    if Path(model).is_dir():
        output = _read_output(model)
        card = _render_card(output, None, None, license, None, None, space_id=repo_id)
        for operation in _upload_operations(output, repo_id, card):
            files[f"{SPACE_MODEL_FOLDER}/{operation.path_in_repo}"] = operation.path_or_fileobj
        models = _recorded_base_models(output, output.summary.get("sources", {}))
        model_link = f"the model in `{SPACE_MODEL_FOLDER}/` (trained with {peft_method(output.method).title})"
    elif _is_hub_id(str(model)):
        models = [str(model)]
        model_link = f"[{model}](https://huggingface.co/{model})"
    else:
        raise ValueError(f"{model} is neither a folder here nor a Hub model id: give the model repository the Space "
                         "should load (namespace/name) or a train.py output folder")
    title = repo_id.split("/")[-1]
    card_data = SpaceCardData(
        title=title, sdk="gradio", sdk_version=gradio_version, app_file="app.py", models=models or None,
        license=license, python_version=f"{sys.version_info.major}.{sys.version_info.minor}", emoji="🖼️",
        colorFrom="blue", colorTo="indigo", pinned=False,
        short_description="Caption an image and see where each word looked",
    )
    readme = SpaceCard.from_template(card_data, template_str=SPACE_README, title=title, model_link=model_link,
                                     gradio_version=gradio_version)
    files["README.md"] = str(readme).encode()
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=source) for name, source in sorted(files.items())]


def refuse_files_with_token(operations: list[CommitOperationAdd], token: str) -> None:
    """Raises `HubPushError` naming the file when any file of the commit contains `token`: a token pickled into a
    file (e.g. an older checkpoint's `training_args.bin`) must never be published."""
    needle = token.encode()
    for operation in operations:
        source = operation.path_or_fileobj
        if isinstance(source, bytes):
            found = needle in source
        else:
            with open(source, "rb") as file:
                found = os.fstat(file.fileno()).st_size > 0 and mmap.mmap(
                    file.fileno(), 0, access=mmap.ACCESS_READ).find(needle) != -1
        if found:
            raise HubPushError(
                f"{source if not isinstance(source, bytes) else operation.path_in_repo} contains your Hugging Face "
                "token, so nothing was pushed; delete the file (or the checkpoint it is in) and push again"
            )


def check_push_settings(training_args) -> None:
    """Fails before training, not after it, when `--push_to_hub` could not push at the end."""
    if not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id your-namespace/model-name")
    _check_repo_id(training_args.hub_model_id)
    require_hub_token(training_args.hub_token)


def without_trainer_push(training_args):
    """The arguments to give `run_training`: with Trainer's own push switched off, since it would replace this card
    by its generic one (and push every checkpoint); `push_training_output` pushes once at the end instead.
    (`run_training` keeps the token out of the checkpoints.)"""
    if not training_args.push_to_hub:
        return training_args
    return dataclasses.replace(training_args, push_to_hub=False)


def push_training_output(training_args, output_dir: str | Path) -> CommitInfo:
    """`train.py --push_to_hub`: pushes the finished output folder to `--hub_model_id`, privately with
    `--hub_private_repo`, with its checkpoints when `--hub_strategy` is `checkpoint` or `all_checkpoints`."""
    repo_id = training_args.hub_model_id
    try:
        commit = push_to_hub(
            output_dir,
            repo_id,
            private=bool(training_args.hub_private_repo),
            token=training_args.hub_token,
            include_checkpoints=training_args.hub_strategy in ("checkpoint", "all_checkpoints"),
        )
    except HubPushError as error:
        raise HubPushError(
            f"{error}\nThe trained model is saved in {output_dir}; push it later with:\n"
            f"  python -m modeling_vitgpt2.applications.hub push {output_dir} --repo_id {repo_id}"
        ) from error
    print(f"[train] pushed to {commit.commit_url}")
    return commit


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking the folder


@dataclass
class _TrainingOutput:
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


def _read_output(output_dir: str | Path) -> _TrainingOutput:
    """Reads and checks a train.py output folder: results, weights (or adapter and its base), remote code."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the --output_dir of a finished train.py run")
    summary = _read_json(folder / "training_summary.json")
    eval_results = _read_json(folder / "eval_results.json")
    if not (folder / "adapter_config.json").is_file():
        _check_publishable_model(folder)
        return _TrainingOutput(folder, summary, eval_results, None, folder, None)

    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has adapter_config.json but no {name}: the adapter was not fully saved")
    _check_remote_code(folder, "processor_config.json")
    adapter_config = _read_json(folder / "adapter_config.json")
    base_folder, base_repo = _locate_base(folder)
    if base_folder is not None:
        _check_publishable_model(base_folder)
    return _TrainingOutput(folder, summary, eval_results, adapter_config, base_folder, base_repo)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: give the output folder of a finished train.py run (it writes the model, "
            "eval_results.json and training_summary.json at the end)"
        )
    return read_json(path)


def _check_publishable_model(folder: Path) -> None:
    """A model folder others can load from the Hub without this package: complete (`check_model_folder`), its
    weights in safetensors (the files pushed), and the remote code its configs name."""
    check_model_folder(folder)
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors: save the model again with "
                                "save_pretrained, which writes it")
    _check_remote_code(folder, "config.json")
    _check_remote_code(folder, "processor_config.json")


def _check_remote_code(folder: Path, config_name: str) -> None:
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
    missing = sorted({reference.split(".")[0] + ".py" for reference in auto_map.values()} - set(_source_files(folder)))
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}, which {config_name}'s auto_map names: save it again with "
            "save_pretrained (which copies the source files) after `import modeling_vitgpt2`"
        )


def _locate_base(folder: Path) -> tuple[Path | None, str | None]:
    """(local base folder to upload, or the Hub id to refer to) for the adapter's base (`adapter_base`)."""
    base = adapter_base(folder)
    if Path(base).is_dir():
        return Path(base), None
    if _is_hub_id(base):
        return None, base
    raise FileNotFoundError(
        f"the adapter's base model {base!r} (adapter_config.json: base_model_name_or_path) is neither a folder "
        "here nor a Hub id: put the base model folder back there, or set base_model_name_or_path to its Hub id"
    )


def _present(folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    return {name: folder / name for name in names if (folder / name).is_file()}


def _source_files(folder: Path) -> dict[str, Path]:
    # The configuration/modeling/processing files save_pretrained copied beside the weights.
    return {path.name: path for path in sorted(folder.glob("*.py"))}


def _model_files(folder: Path) -> dict[str, Path]:
    files = _present(folder, MODEL_FILES + PROCESSOR_FILES)
    files.update({path.name: path for path in sorted(folder.glob(MODEL_SHARDS))})
    files.update(_source_files(folder))
    return files


def _is_hub_id(name: str | None) -> bool:
    if not name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise ValueError(
            f"repo id {repo_id!r} must look like your-namespace/model-name (the card's usage snippets name it)"
        )


# ----------------------------------------------------------------------------------------------------------------
# The commit


def _upload_operations(
    output: _TrainingOutput, repo_id: str, card: ModelCard, include_checkpoints: bool = False
) -> list[CommitOperationAdd]:
    """The commit: repository path -> local file, or bytes for the card and a rewritten adapter_config.json."""
    files: dict[str, Path | bytes] = {}
    if output.is_adapter:
        files.update(_present(output.folder, ADAPTER_FILES + PROCESSOR_FILES))
        files.update(_source_files(output.folder))
        if output.model_folder is not None:
            for name, path in _model_files(output.model_folder).items():
                files[f"{BASE_MODEL_FOLDER}/{name}"] = path
            # peft has no field for a base in a subfolder; naming this repository at least points readers (and the
            # card) here instead of at a folder on the training machine.
            adapter_config = {**output.adapter_config, "base_model_name_or_path": repo_id}
            files["adapter_config.json"] = (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode()
    else:
        files.update(_model_files(output.folder))
    files.update(_present(output.folder, RESULT_FILES + (ATTENTION_EXAMPLE,)))
    if include_checkpoints:
        for checkpoint in sorted(output.folder.glob("checkpoint-*")):
            for path in sorted(checkpoint.rglob("*")):
                if path.is_file():
                    files[path.relative_to(output.folder).as_posix()] = path
    files["README.md"] = str(card).encode()
    return [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(source) if isinstance(source, Path) else source)
        for name, source in sorted(files.items())
    ]


# ----------------------------------------------------------------------------------------------------------------
# The card


def _render_card(
    output: _TrainingOutput,
    repo_id: str | None,
    dataset_name: str | None,
    license: str,
    base_models: list[str] | None,
    template_path: str | Path | None,
    space_id: str | None = None,
) -> ModelCard:
    method = peft_method(output.method)  # the registered record: title, tag and what trained
    # What the run started from, as train.py records it in training_summary.json (absent from older runs).
    sources = output.summary.get("sources", {})
    dataset_name = dataset_name or (sources.get("dataset_name") if _is_hub_id(sources.get("dataset_name")) else None)
    synthetic_data = bool(sources.get("synthetic_data"))
    if dataset_name:
        dataset_type, dataset_label = dataset_name, dataset_name
        dataset_description = f"[`{dataset_name}`](https://huggingface.co/datasets/{dataset_name})"
    elif synthetic_data:
        dataset_type, dataset_label = "synthetic-shapes", "Synthetic shapes"
        dataset_description = "the built-in synthetic set of `train.py` (coloured shapes with templated captions)"
    else:
        dataset_type, dataset_label = "custom", "Local validation set"
        dataset_description = "a local dataset (not published on the Hub)"

    metrics = [{"name": display, "type": key, "value": output.eval_results[f"eval_{key}"],
                "text": format_metric(key, output.eval_results[f"eval_{key}"])}
               for key, display in metric_names().items() if f"eval_{key}" in output.eval_results]
    model_name = repo_id.split("/")[-1] if repo_id else output.folder.name
    card_data = ModelCardData(
        model_name=model_name,
        library_name="peft" if output.is_adapter else "transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_models if base_models is not None else _recorded_base_models(output, sources) or None,
        datasets=[dataset_name] if dataset_name else None,
        license=license,
        tags=["image-captioning", "vision", "vit", "gpt2", "timm", "vitgpt2"]
        + [tag for tag in [method.tag] if tag],
        eval_results=[
            EvalResult(
                task_type="image-to-text",
                dataset_type=dataset_type,
                dataset_name=dataset_label,
                dataset_split="validation",
                metric_type=metric["type"],
                metric_name=metric["name"],
                metric_value=round(metric["value"], 4),
            )
            for metric in metrics
        ],
    )
    model_folder = output.model_folder
    return ModelCard.from_template(
        card_data,
        template_str=_read_template(template_path),
        model_name=model_name,  # ModelCardData moves it into the model-index, out of the template's variables
        repo_id=repo_id or f"<your-namespace>/{model_name}",
        is_adapter=output.is_adapter,
        base_bundled=output.is_adapter and model_folder is not None,
        base_repo=output.base_repo,
        peft_method=output.method,
        method_title=method.title,
        method_description=method.describe(output.summary.get("peft", {})),
        peft=output.summary.get("peft", {}),
        summary=output.summary,
        config=_read_json(model_folder / "config.json") if model_folder else None,
        generation=_optional_json(model_folder / "generation_config.json") if model_folder else None,
        dataset_description=dataset_description,
        synthetic_data=synthetic_data,
        metrics=metrics,
        has_clip_score="eval_clip_score" in output.eval_results,
        attention_example=ATTENTION_EXAMPLE if (output.folder / ATTENTION_EXAMPLE).is_file() else None,
        space_id=space_id,
    )


def _read_template(template_path: str | Path | None) -> str:
    if template_path is not None:
        return Path(template_path).read_text(encoding="utf-8")
    return resources.files(__package__).joinpath(TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def _recorded_base_models(output: _TrainingOutput, sources: dict) -> list[str]:
    """Hub ids the model was built from: an adapter's Hub base, else what the run recorded starting from."""
    if output.base_repo:
        return [output.base_repo]
    candidates = [sources.get("model_name_or_path"), _timm_hub_id(sources.get("encoder")), sources.get("decoder")]
    return [name for name in candidates if _is_hub_id(name)]


def _timm_hub_id(encoder: str | None) -> str | None:
    """`vit_large_patch14_clip_224.openai` -> `timm/vit_large_patch14_clip_224.openai`; None for a local file."""
    if not encoder or Path(encoder).exists():
        return None
    if encoder.startswith("hf-hub:"):
        return encoder.removeprefix("hf-hub:")
    return timm.models.get_pretrained_cfg(encoder).hf_hub_id


def _optional_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def _default_commit_message(output: _TrainingOutput, repo_id: str) -> str:
    return (
        f"Upload {repo_id.split('/')[-1]} ({peft_method(output.method).title}, "
        f"CIDEr {output.eval_results['eval_cider']:.4f})"
    )


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None, prog: str = "vitgpt2 hub") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Render the model card of a train.py output folder, or push the folder to the Hugging Face Hub. "
        f"The token comes from `hf auth login` or HF_TOKEN. Put a picture from attention_maps.draw_attention_maps "
        f"at OUTPUT_DIR/{ATTENTION_EXAMPLE} to show it on the card.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    card_parser = commands.add_parser("card", help="print the rendered model card")
    push_parser = commands.add_parser("push", help="upload the folder with its card in one commit")
    space_parser = commands.add_parser("space", help="push the demo page (app.py) as a Gradio Space, in one commit")
    space_parser.add_argument("model", help="the model repository the Space loads (namespace/name), or a train.py "
                                            "output folder to upload into the Space")
    space_parser.add_argument("--repo_id", required=True, help="namespace/name of the Space")
    space_parser.add_argument("--private", action="store_true", help="create the Space as private")
    space_parser.add_argument("--license", default="apache-2.0", help="license id for the Space (default apache-2.0)")
    for command in (card_parser, push_parser):
        command.add_argument("output_dir", help="the --output_dir of a finished train.py run")
        command.add_argument("--dataset_name", help="Hub id of the dataset trained and evaluated on")
        command.add_argument("--license", default="apache-2.0", help="license id for the card (default apache-2.0)")
        command.add_argument(
            "--base_model", action="append", dest="base_models", help="Hub id the model was built from (repeatable)"
        )
    card_parser.add_argument("--repo_id", help="namespace/name the usage snippets load from")
    for command in (card_parser, push_parser):
        command.add_argument("--space", dest="space_id", help="namespace/name of a Space with the demo page for this "
                                                              "model (`space` pushes one); the card links it")
    push_parser.add_argument("--repo_id", required=True, help="namespace/name of the model repository")
    push_parser.add_argument("--private", action="store_true", help="create the repository as private")
    push_parser.add_argument(
        "--include_checkpoints", action="store_true", help="also upload the checkpoint-* folders (for resuming)"
    )
    push_parser.add_argument("--commit_message", help="default: the model name, method and CIDEr")
    args = parser.parse_args(argv)
    return run_command(f"{prog} {args.command}", lambda: run(args))


def run(args: argparse.Namespace) -> None:
    if args.command == "card":
        print(build_model_card(args.output_dir, args.repo_id, args.dataset_name, args.license, args.base_models,
                               space_id=args.space_id))
        return
    if args.command == "space":
        commit = push_space(args.model, args.repo_id, private=args.private, license=args.license)
        print(f"pushed the demo page for {args.model} to https://huggingface.co/spaces/{args.repo_id} "
              f"({commit.commit_url})")
        return
    commit = push_to_hub(
        args.output_dir,
        args.repo_id,
        private=args.private,
        include_checkpoints=args.include_checkpoints,
        commit_message=args.commit_message,
        dataset_name=args.dataset_name,
        license=args.license,
        base_models=args.base_models,
        space_id=args.space_id,
    )
    print(f"pushed {args.output_dir} to https://huggingface.co/{args.repo_id} ({commit.commit_url})")


if __name__ == "__main__":
    sys.exit(main(prog="python -m modeling_vitgpt2.applications.hub"))
