"""One commit to a model repository: the output folder's files read where they lie, the rendered card and a
rewritten adapter_config.json and training_summary.json passed as bytes, and never a file holding the token."""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
from pathlib import Path

import httpx2
import huggingface_hub.constants
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import HfHubHTTPError

from ...inference.loading import BASE_MODEL_FOLDER
from ...training.peft_methods import peft_method
from ...utils.errors import UserError
from .card import render_card
from .output_folder import (
    ADAPTER_FILES,
    ATTENTION_EXAMPLE,
    PROCESSOR_FILES,
    RESULT_FILES,
    TrainingOutput,
    check_repo_id,
    model_files,
    present_files,
    read_output,
    source_files,
)

__all__ = [
    "HubPushError",
    "TOKEN_HELP",
    "check_push_settings",
    "push_to_hub",
    "push_training_output",
    "refuse_files_with_token",
    "require_hub_token",
    "upload_operations",
    "without_local_paths",
    "without_trainer_push",
]

TOKEN_HELP = (
    "log in with `hf auth login`, or set HF_TOKEN to a write token from https://huggingface.co/settings/tokens"
)


class HubPushError(UserError, RuntimeError):
    """The push could not happen or the Hub refused it; the message says what to do next. Nothing local changed."""


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
    check_repo_id(repo_id)
    token = require_hub_token(token)
    output = read_output(output_dir)
    card = render_card(output, repo_id, dataset_name, license, base_models, None, space_id)
    operations = upload_operations(output, repo_id, card, include_checkpoints)
    refuse_files_with_token(operations, token)
    # Everything is built before the first Hub call: a failure after create_repo would leave an empty repository.
    commit_message = commit_message or _default_commit_message(output, repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
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
    check_repo_id(training_args.hub_model_id)
    require_hub_token(training_args.hub_token)
    if huggingface_hub.constants.HF_HUB_OFFLINE:  # read now: set by the environment, or by a test
        raise HubPushError("--push_to_hub cannot push while HF_HUB_OFFLINE is set (huggingface_hub makes no "
                           "request then): unset it, or train without --push_to_hub and push the folder later with "
                           "`vitgpt2 hub push OUTPUT_DIR --repo_id NAME`")


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



def upload_operations(
    output: TrainingOutput, repo_id: str, card: ModelCard, include_checkpoints: bool = False
) -> list[CommitOperationAdd]:
    """The commit: repository path -> local file, or bytes for the card and a rewritten adapter_config.json and
    training_summary.json (`without_local_paths`)."""
    files: dict[str, Path | bytes] = {}
    if output.is_adapter:
        files.update(present_files(output.folder, ADAPTER_FILES + PROCESSOR_FILES))
        files.update(source_files(output.folder))
        if output.model_folder is not None:
            for name, path in model_files(output.model_folder).items():
                files[f"{BASE_MODEL_FOLDER}/{name}"] = path
            # peft has no field for a base in a subfolder; naming this repository at least points readers (and the
            # card) here instead of at a folder on the training machine.
            adapter_config = {**output.adapter_config, "base_model_name_or_path": repo_id}
            files["adapter_config.json"] = (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode()
    else:
        files.update(model_files(output.folder))
    files.update(present_files(output.folder, RESULT_FILES + (ATTENTION_EXAMPLE,)))
    # The summary records what the run read as given on the training machine (shards, base model, dataset folder);
    # those paths say nothing to readers of the repository and may say too much about that machine.
    files["training_summary.json"] = (json.dumps(without_local_paths(output.summary), indent=2) + "\n").encode()
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



def without_local_paths(value):
    """Parsed JSON with every local path in it, key or value, cut to its base name (`/home/alice/data/shard-000.tar`
    -> `shard-000.tar`). A local path is an absolute one or one that exists here; Hub ids and URLs are neither."""
    if isinstance(value, dict):
        return {without_local_paths(key): without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and (os.path.isabs(os.path.expanduser(value)) or os.path.exists(value)):
        return Path(value).name
    return value


def _default_commit_message(output: TrainingOutput, repo_id: str) -> str:
    return (
        f"Upload {repo_id.split('/')[-1]} ({peft_method(output.method).title}, "
        f"CIDEr {output.eval_results['eval_cider']:.4f})"
    )
