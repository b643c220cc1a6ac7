"""The package as users get it: built into a wheel and imported from there, outside this checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "modeling_vitgpt2"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (so the build leaves nothing in the checkout)."""
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(source)],
        check=True, capture_output=True,
    )
    (built,) = dist.glob("modeling_vitgpt2-*.whl")
    return built


def package_files() -> set[str]:
    """Every file the package needs at run time: its modules and the data files it reads (`importlib.resources`)."""
    return {
        path.relative_to(REPO).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_the_wheel_holds_every_module_and_data_file_the_package_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert package_files() <= names, sorted(package_files() - names)
    assert "modeling_vitgpt2/applications/hub/model_card_template.md" in names
    # The checkout's `model_card/template.md` (where people edit the card) is the packaged file, not a copy.
    assert (REPO / "model_card" / "template.md").resolve() == (PACKAGE / "applications" / "hub" / "model_card_template.md").resolve()


def test_hub_card_and_push_work_from_the_wheel_outside_the_checkout(wheel, tiny_model, tiny_processor, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel: installing it is unpacking it onto the path
    run = tmp_path / "run"
    tiny_model.save_pretrained(run)
    tiny_processor.save_pretrained(run)
    total = sum(parameter.numel() for parameter in tiny_model.parameters())
    (run / "eval_results.json").write_text(json.dumps({"eval_cider": 0.5}))
    (run / "training_summary.json").write_text(json.dumps({
        "peft_method": "full", "trainable_parameters": total, "total_parameters": total, "world_size": 1,
        "train_captions": 8, "eval_images": 2, "hyperparameters": {"learning_rate": 0.001}, "peft": {},
        "sources": {"synthetic_data": True},
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # `card` prints the card; `push` builds the same commit with the Hub cut off at HfApi (recorded, not sent).
    script = (
        "import sys, modeling_vitgpt2, modeling_vitgpt2.applications.hub as hub\n"
        "from huggingface_hub import CommitInfo, HfApi, RepoUrl\n"
        "print(modeling_vitgpt2.__file__, file=sys.stderr)\n"
        "hub.main(['card', sys.argv[1], '--repo_id', 'someone/tiny'])\n"
        "def commit(self, repo_id, operations, **kwargs):\n"
        "    readme = next(op for op in operations if op.path_in_repo == 'README.md')\n"
        "    with readme.as_file() as card:\n"
        "        print('PUSHED', sorted(op.path_in_repo for op in operations), card.read().decode())\n"
        "    return CommitInfo(commit_url='https://huggingface.co/someone/tiny/commit/0', oid='0',\n"
        "                      commit_message='', commit_description='')\n"
        "HfApi.create_repo = lambda self, repo_id, **kwargs: RepoUrl('https://huggingface.co/' + repo_id)\n"
        "HfApi.create_commit = commit\n"
        "hub.main(['push', sys.argv[1], '--repo_id', 'someone/tiny'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(run)], cwd=elsewhere, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test_token"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stderr.strip().splitlines()[-1]).is_relative_to(site), "imported the checkout, not the wheel"
    card, pushed = result.stdout.split("PUSHED", 1)
    assert "pipeline_tag: image-text-to-text" in card and "someone/tiny" in card and "CIDEr" in card
    assert "'README.md'" in pushed and "'model.safetensors'" in pushed and "pipeline_tag: image-text-to-text" in pushed
