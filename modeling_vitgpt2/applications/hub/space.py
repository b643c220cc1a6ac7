"""The demo page as a Gradio Space, in one commit: `app.py`, this package's source, `requirements.txt` pinned to the
versions installed here, and a README whose Space metadata names the model repository the page loads."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, SpaceCard, SpaceCardData
from huggingface_hub.errors import HfHubHTTPError

from ...training.peft_methods import peft_method
from .card import recorded_base_models, render_card
from .output_folder import check_repo_id, is_hub_id, read_output
from .push import TOKEN_HELP, HubPushError, refuse_files_with_token, require_hub_token, upload_operations

__all__ = ["push_space", "space_requirements"]

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
    check_repo_id(repo_id)
    token = require_hub_token(token)
    operations = space_operations(model, repo_id, license)
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
    from packaging.version import Version

    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise HubPushError(f"{DISTRIBUTION} is not installed, so its dependencies are unknown: pip install -e .") \
            from None
    names = [Requirement(line).name for line in declared if Requirement(line).marker is None]  # extras have markers
    # The public version: a local tag such as torch's `+cu126` (a download.pytorch.org build) is no release on PyPI.
    return "".join(f"{name}=={Version(metadata.version(name)).public}\n" for name in names)


def space_operations(model: str | Path, repo_id: str, license: str) -> list[CommitOperationAdd]:
    try:
        gradio_version = metadata.version("gradio")
    except metadata.PackageNotFoundError:
        raise HubPushError("Gradio is not installed: pip install -e \".[demo]\"; the Space is pinned to the Gradio "
                           "version the page is tested with here") from None
    files: dict[str, str | bytes] = {"app.py": SPACE_APP.encode(), "requirements.txt": space_requirements().encode()}
    package = Path(__file__).resolve().parents[2]  # modeling_vitgpt2/
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".md", ".yaml") and "__pycache__" not in path.parts:
            files[f"{package.name}/{path.relative_to(package).as_posix()}"] = str(path)

    if Path(model).is_dir():
        output = read_output(model)
        card = render_card(output, None, None, license, None, None, space_id=repo_id)
        for operation in upload_operations(output, repo_id, card):
            files[f"{SPACE_MODEL_FOLDER}/{operation.path_in_repo}"] = operation.path_or_fileobj
        models = recorded_base_models(output, output.summary.get("sources", {}))
        model_link = f"the model in `{SPACE_MODEL_FOLDER}/` (trained with {peft_method(output.method).title})"
    elif is_hub_id(str(model)):
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
