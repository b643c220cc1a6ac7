"""Publishing to the Hub: the card, the single commit and what it holds, and that the uploaded files load back.

The network is cut at the `HfApi` boundary: `create_repo` and `create_commit` are replaced by recorders (and
`upload_folder`, which Trainer's own push would use, by a tripwire), so nothing leaves the machine. The recorded
operations are written into a folder: exactly what the repository would hold, which is then loaded back.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import httpx2  # the HTTP client huggingface_hub 2.x raises its errors from
import huggingface_hub.constants
import pytest
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl, constants
from huggingface_hub.utils import hf_raise_for_status
from PIL import Image

from conftest import REPO, serving_app, training_arguments
from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2Processor
from modeling_vitgpt2.applications.hub import HubPushError, build_model_card, main, push_space, push_to_hub
from modeling_vitgpt2.evaluation.metrics import metric_names
from modeling_vitgpt2.inference.loading import load_for_inference
from modeling_vitgpt2.training.run import run_training

REPO_ID = "someone/vitgpt2-test"
SPACE_ID = "someone/vitgpt2-demo"
RESULTS = {"eval_results.json", "training_summary.json", "train_results.json", "all_results.json",
           "eval_predictions.json"}
PROCESSOR = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "processing_vitgpt2.py"}
FULL_MODEL = {"config.json", "generation_config.json", "model.safetensors", "configuration_vitgpt2.py",
              "modeling_vitgpt2.py"} | PROCESSOR


@pytest.fixture(scope="module")
def full_run(shapes, pretrained_parts, tmp_path_factory):
    """A full-training output folder with a checkpoint and an attention picture the user saved beside it."""
    output_dir = tmp_path_factory.mktemp("runs") / "full"
    run_training(*training_arguments(shapes, pretrained_parts, output_dir, peft="full", max_steps=2, save_strategy="steps",
                            save_steps=2))
    Image.new("RGB", (8, 8), "red").save(output_dir / "attention_example.png")
    return output_dir


@pytest.fixture(scope="module")
def lora_run(shapes, pretrained_parts, tmp_path_factory):
    """A LoRA output folder whose base was built from the pretrained parts, so it lives in OUTPUT/base_model."""
    output_dir = tmp_path_factory.mktemp("runs") / "lora"
    run_training(*training_arguments(shapes, pretrained_parts, output_dir, peft="lora", max_steps=2))
    return output_dir


def recording_hub(monkeypatch) -> SimpleNamespace:
    """Records repository creations and commits instead of sending them; a token is 'logged in'."""
    recorded = SimpleNamespace(repos=[], repo_options=[], commits=[], folder_uploads=[])

    def create_repo(self, repo_id, *, private=False, exist_ok=False, **kwargs):
        recorded.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "token": self.token})
        recorded.repo_options.append(kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, **kwargs):
        recorded.commits.append({"repo_id": repo_id, "operations": list(operations), "message": commit_message,
                                 "repo_type": repo_type})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd", oid="0123abcd",
                          commit_message=commit_message, commit_description="")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: recorded.folder_uploads.append(kwargs))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this Hub is local
    return recorded


@pytest.fixture()
def hub(monkeypatch):
    return recording_hub(monkeypatch)


@pytest.fixture(scope="module")
def repositories(full_run, lora_run, tmp_path_factory):
    """What the Hub repository holds after pushing each run."""
    folder = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub = recording_hub(monkeypatch)
        push_to_hub(full_run, REPO_ID)
        push_to_hub(lora_run, REPO_ID)
    full_commit, lora_commit = hub.commits
    return SimpleNamespace(full=write_repository(full_commit, folder / "full"),
                           lora=write_repository(lora_commit, folder / "lora"))


@pytest.fixture(scope="module")
def loaded_without_the_package(repositories, shapes, tmp_path_factory) -> dict:
    """Both repositories loaded as a user without this package would, in one fresh interpreter (importing
    transformers once costs more than everything else it does)."""
    script = f"""
        import json, sys
        sys.modules["modeling_vitgpt2"] = None  # the classes must come from the uploaded source files
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

        full, lora, images = {str(repositories.full)!r}, {str(repositories.lora)!r}, {validation_images(shapes)!r}

        def caption(model, processor):
            return processor.batch_decode(model.generate(**processor(images=images)))

        def pipe(captioner):
            return [captioner(images=image, text="")[0]["generated_text"].strip() for image in images]

        model = AutoModelForImageTextToText.from_pretrained(full, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(full, trust_remote_code=True)
        results = {{"full": {{"module": type(model).__module__, "captions": caption(model, processor),
                              "pipeline": pipe(pipeline("image-text-to-text", model=full, trust_remote_code=True))}}}}

        base = AutoModelForImageTextToText.from_pretrained(lora + "/base_model", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(lora, trust_remote_code=True)
        base_captions = caption(base, processor)
        model = PeftModel.from_pretrained(base, lora).eval()
        captions = caption(model, processor)
        merged = pipeline("image-text-to-text", model=model.merge_and_unload(), processor=processor)
        results["lora"] = {{"module": type(base).__module__, "base": base_captions, "captions": captions,
                            "pipeline": pipe(merged)}}
        print(json.dumps(results))
    """
    folder = tmp_path_factory.mktemp("fresh-process")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(folder / "modules")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                            cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture()
def logged_out(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


def files_of(commit) -> dict:
    return {operation.path_in_repo: operation.path_or_fileobj for operation in commit["operations"]}


def write_repository(commit, folder):
    """What the Hub repository holds after the commit."""
    for name, source in files_of(commit).items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
    return folder


def digest(folder) -> dict:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def validation_images(shapes) -> list[str]:
    return [str(path) for path in sorted(shapes.val_images.iterdir())]


def trained_captions(output_dir, shapes) -> list[str]:
    """The captions the trained model wrote in its final evaluation, in `validation_images` order."""
    predictions = json.loads((output_dir / "eval_predictions.json").read_text())
    return [predictions[path.stem] for path in sorted(shapes.val_images.iterdir())]


def test_full_run_is_pushed_as_model_code_processor_card_and_results_in_one_commit(full_run, hub):
    before = digest(full_run)
    commit_info = push_to_hub(full_run, REPO_ID, private=True)

    assert hub.repos == [{"repo_id": REPO_ID, "private": True, "exist_ok": True, "token": "hf_test_token"}]
    assert len(hub.commits) == 1 and commit_info.commit_url.endswith("/commit/0123abcd")
    assert hub.commits[0]["message"].startswith("Upload vitgpt2-test (full training, CIDEr ")
    files = files_of(hub.commits[0])
    assert set(files) == FULL_MODEL | RESULTS | {"attention_example.png", "README.md"}
    # Everything but the card and the summary (without local paths) is uploaded from the output folder, unchanged.
    assert all(source == str(full_run / name) for name, source in files.items()
               if name not in ("README.md", "training_summary.json"))
    assert digest(full_run) == before


def test_pushed_full_model_card_carries_metrics_and_the_repository_loads_back_to_the_same_captions(
    full_run, shapes, repositories, loaded_without_the_package
):
    expected = trained_captions(full_run, shapes)
    card = ModelCard.load(repositories.full / "README.md")
    cider = json.loads((full_run / "eval_results.json").read_text())["eval_cider"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.model_name == "vitgpt2-test" and card.data.license == "apache-2.0"
    run_metrics = json.loads((full_run / "eval_results.json").read_text())
    # every registered metric the run evaluated, in the registry's order
    expected_types = [key for key in metric_names() if f"eval_{key}" in run_metrics]
    assert expected_types[:6] == ["cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"]
    assert [(result.metric_type, result.dataset_split) for result in card.data.eval_results] == [
        (key, "validation") for key in expected_types]
    assert card.data.eval_results[0].metric_value == pytest.approx(cider, abs=1e-4)
    assert f"| BLEU-4 | {run_metrics['eval_bleu_4']:.4f} |" in card.text
    assert "![Cross-attention of each generated word over the image](attention_example.png)" in card.text
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card.text

    model = ViTGPT2ForConditionalGeneration.from_pretrained(repositories.full).eval()
    processor = ViTGPT2Processor.from_pretrained(repositories.full)
    assert processor.batch_decode(model.generate(**processor(images=validation_images(shapes)))) == expected

    loaded = loaded_without_the_package["full"]
    assert loaded["module"].startswith("transformers_modules")
    assert loaded["captions"] == expected and loaded["pipeline"] == expected


def test_lora_run_is_pushed_as_adapter_with_its_local_base_inside_the_repository(lora_run, hub):
    before = digest(lora_run)
    push_to_hub(lora_run, REPO_ID)

    assert len(hub.repos) == 1 and len(hub.commits) == 1
    files = files_of(hub.commits[0])
    base_files = {f"base_model/{name}" for name in FULL_MODEL}
    adapter_files = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert set(files) == adapter_files | PROCESSOR | RESULTS | base_files
    assert all(source == str(lora_run / name) for name, source in files.items()
               if name not in ("README.md", "adapter_config.json", "training_summary.json"))
    uploaded_config = json.loads(files["adapter_config.json"])
    saved_config = json.loads((lora_run / "adapter_config.json").read_text())
    assert saved_config["base_model_name_or_path"] == str((lora_run / "base_model").resolve())
    assert uploaded_config == {**saved_config, "base_model_name_or_path": REPO_ID}
    assert b"model-index" in files["README.md"] and b"More Information Needed" not in files["README.md"]  # not peft's
    assert digest(lora_run) == before


def test_pushed_adapter_loads_back_on_its_uploaded_base_to_the_same_captions(
    lora_run, shapes, repositories, loaded_without_the_package
):
    card = ModelCard.load(repositories.lora / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert card.data.eval_results[0].metric_type == "cider"
    assert "PeftModel.from_pretrained(base, folder)" in card.text and "attention_example" not in card.text

    expected = trained_captions(lora_run, shapes)
    loaded = loaded_without_the_package["lora"]
    assert loaded["module"].startswith("transformers_modules")
    assert loaded["captions"] == expected and loaded["pipeline"] == expected
    assert loaded["base"] != expected, "the adapter must change the captions, or this test proves nothing"


def test_adapter_on_a_hub_base_refers_to_it_instead_of_uploading_it(lora_run, hub, tmp_path):
    adapter_only = tmp_path / "adapter"
    shutil.copytree(lora_run, adapter_only, ignore=shutil.ignore_patterns("base_model"))
    config = json.loads((adapter_only / "adapter_config.json").read_text())
    (adapter_only / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/base"}))

    push_to_hub(adapter_only, REPO_ID)
    files = files_of(hub.commits[0])
    assert not any(name.startswith("base_model/") for name in files)
    assert files["adapter_config.json"] == str(adapter_only / "adapter_config.json")
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == ["someone/base"]
    assert 'AutoModelForImageTextToText.from_pretrained("someone/base", trust_remote_code=True)' in card.text


def test_checkpoints_are_uploaded_only_when_asked(full_run, hub):
    push_to_hub(full_run, REPO_ID)
    push_to_hub(full_run, REPO_ID, include_checkpoints=True)
    without, with_checkpoints = (set(files_of(commit)) for commit in hub.commits)
    assert not any(name.startswith("checkpoint-") for name in without)
    assert {"checkpoint-2/optimizer.pt", "checkpoint-2/trainer_state.json", "checkpoint-2/model.safetensors"} <= (
        with_checkpoints - without)


def test_card_names_what_the_run_started_from(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    summary = json.loads((run / "training_summary.json").read_text())
    summary["sources"] = {"encoder": "vit_large_patch14_clip_224.openai", "decoder": "openai-community/gpt2",
                          "model_name_or_path": None, "dataset_name": "yerevann/coco-karpathy", "synthetic_data": False}
    (run / "training_summary.json").write_text(json.dumps(summary))
    eval_results = json.loads((run / "eval_results.json").read_text())
    (run / "eval_results.json").write_text(json.dumps({**eval_results, "eval_clip_score": 0.71234}))

    card = build_model_card(run, REPO_ID)
    assert card.data.base_model == ["timm/vit_large_patch14_clip_224.openai", "openai-community/gpt2"]
    assert card.data.datasets == ["yerevann/coco-karpathy"]
    results = {result.metric_type: result for result in card.data.eval_results}
    assert {result.dataset_type for result in card.data.eval_results} == {"yerevann/coco-karpathy"}
    assert results["clip_score"].metric_value == 0.7123 and "| CLIPScore | 0.7123 |" in card.text

    summary["sources"].update(encoder=str(tmp_path / "vit.safetensors"), decoder=None, dataset_name=None,
                              synthetic_data=True)
    (run / "training_summary.json").write_text(json.dumps(summary))
    (tmp_path / "vit.safetensors").touch()
    card = build_model_card(run, REPO_ID)
    assert card.data.base_model is None and card.data.datasets is None  # local parts are never named as bases
    assert "trained on synthetic images of coloured shapes only" in card.text


def streamed_run(full_run, folder):
    """`full_run` as a run trained on --train_shards records itself (training/run.py): no caption count, a `stream`
    section counting what was read, and the shards by their paths on the training machine."""
    shutil.copytree(full_run, folder)
    shard = str(folder.parent / "private-data" / "shard-000.tar")
    summary = json.loads((folder / "training_summary.json").read_text())
    summary.update(train_captions=None, stream={
        "train_shards": [shard], "dataset_name": None, "counted_from_step": 0, "used_samples": 4096,
        "skipped_samples": 1, "skipped_by_reason": {"image does not decode": 1},
        "skipped_by_shard": {shard: {"image does not decode": 1}}})
    summary["sources"].update(model_name_or_path=str(folder.parent / "base-model"), dataset_name=None,
                              synthetic_data=False)
    (folder / "training_summary.json").write_text(json.dumps(summary))
    return folder


def test_card_of_a_streamed_run_counts_the_samples_it_read(full_run, tmp_path, capsys):
    run = streamed_run(full_run, tmp_path / "streamed")
    assert main(["card", str(run), "--repo_id", REPO_ID]) == 0
    assert "Trained on a stream of 4,096 image-caption samples" in capsys.readouterr().out

    summary = json.loads((run / "training_summary.json").read_text())
    summary["stream"] = {**summary["stream"], "samples": "not counted: with --dataloader_num_workers > 0 ..."}
    del summary["stream"]["used_samples"]
    (run / "training_summary.json").write_text(json.dumps(summary))
    assert "Trained on a streamed dataset" in build_model_card(run, REPO_ID).text


def test_pushed_training_summary_names_no_local_path(full_run, hub, tmp_path):
    run = streamed_run(full_run, tmp_path / "streamed")
    push_to_hub(run, REPO_ID)
    uploaded = json.loads((write_repository(hub.commits[0], tmp_path / "hub") / "training_summary.json").read_text())
    assert str(tmp_path) not in json.dumps(uploaded)
    assert uploaded["stream"]["train_shards"] == ["shard-000.tar"]
    assert uploaded["stream"]["skipped_by_shard"] == {"shard-000.tar": {"image does not decode": 1}}
    assert uploaded["sources"]["model_name_or_path"] == "base-model"
    saved = json.loads((run / "training_summary.json").read_text())
    assert uploaded["hyperparameters"] == saved["hyperparameters"]  # the rest as the run wrote it

    summary = {**saved, "sources": {**saved["sources"], "decoder": "openai-community/gpt2",
                                    "dataset_name": "https://example.com/captions.tar"}}
    (run / "training_summary.json").write_text(json.dumps(summary))
    push_to_hub(run, REPO_ID)
    uploaded = json.loads((write_repository(hub.commits[1], tmp_path / "hub") / "training_summary.json").read_text())
    assert uploaded["sources"]["decoder"] == "openai-community/gpt2"  # Hub ids and URLs are not local paths
    assert uploaded["sources"]["dataset_name"] == "https://example.com/captions.tar"


@pytest.mark.parametrize("eval_results, field", [
    ({"eval_bleu_4": 0.1, "eval_loss": 2.0}, "eval_cider"),
    ([0.5, 0.1], "JSON object"),
    ({"eval_cider": None}, "eval_cider"),
    ({"eval_cider": "0.5"}, "eval_cider"),
])
def test_malformed_eval_results_is_one_line_before_anything_reaches_the_hub(full_run, hub, tmp_path, capsys,
                                                                            eval_results, field):
    run = tmp_path / "edited"
    shutil.copytree(full_run, run)
    (run / "eval_results.json").write_text(json.dumps(eval_results))
    assert main(["push", str(run), "--repo_id", REPO_ID]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert str(run / "eval_results.json") in message and field in message
    assert hub.repos == [] and hub.commits == []  # no empty repository left behind


def test_card_states_the_generation_defaults_a_config_leaves_out(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    generation = json.loads((run / "generation_config.json").read_text())
    assert "beam search with {num_beams} beams, at most {max_length} tokens".format(**generation) in (
        build_model_card(run, REPO_ID).text)
    for name in ("num_beams", "max_length"):
        generation.pop(name)
    (run / "generation_config.json").write_text(json.dumps(generation))
    # What generate() then uses: transformers' defaults.
    assert "greedy search, at most 20 tokens" in build_model_card(run, REPO_ID).text


def test_missing_token_is_a_clear_error_and_changes_nothing(full_run, hub, logged_out):
    before = digest(full_run)
    with pytest.raises(HubPushError, match="hf auth login.*HF_TOKEN"):
        push_to_hub(full_run, REPO_ID)
    assert hub.repos == [] and hub.commits == []
    assert digest(full_run) == before


def test_refused_upload_is_a_clear_error_and_changes_nothing(full_run, hub, monkeypatch):
    def refuse(self, repo_id, operations, **kwargs):
        response = httpx2.Response(
            403, json={"error": f"You don't have the rights to create a commit in {repo_id}"},
            request=httpx2.Request("POST", f"https://huggingface.co/api/models/{repo_id}/commit/main"),
        )
        hf_raise_for_status(response)

    monkeypatch.setattr(HfApi, "create_commit", refuse)
    before = digest(full_run)
    with pytest.raises(HubPushError) as error:
        push_to_hub(full_run, REPO_ID)
    message = str(error.value)
    assert "refused" in message and "don't have the rights" in message
    assert "hf auth login" in message and "HF_TOKEN" in message and "is unchanged" in message
    assert digest(full_run) == before


def test_push_without_network_is_one_clear_line_and_changes_nothing(full_run, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    before = digest(full_run)
    assert main(["push", str(full_run), "--repo_id", REPO_ID]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "Could not reach the Hub" in message and str(full_run) in message and "unchanged" in message
    assert digest(full_run) == before


def test_a_file_holding_the_token_is_never_uploaded(full_run, hub, tmp_path):
    output_dir = tmp_path / "leaky"
    shutil.copytree(full_run, output_dir)
    leaky = output_dir / "checkpoint-2" / "notes.bin"
    leaky.write_bytes(b"\x80\x04 pickled arguments ... hub_token hf_test_token ...")
    with pytest.raises(HubPushError, match=r"checkpoint-2/notes\.bin contains your Hugging Face token"):
        push_to_hub(output_dir, REPO_ID, include_checkpoints=True)
    assert hub.commits == [] and hub.repos == []
    push_to_hub(output_dir, REPO_ID)  # without the checkpoints, nothing holds it
    assert len(hub.commits) == 1


def test_command_line_prints_the_card_and_pushes(full_run, hub, capsys):
    main(["card", str(full_run), "--repo_id", REPO_ID])
    assert ModelCard(capsys.readouterr().out.strip()).data.eval_results[0].metric_type == "cider"
    main(["push", str(full_run), "--repo_id", REPO_ID, "--private", "--include_checkpoints"])
    assert hub.repos[0]["private"] and any(name.startswith("checkpoint-2/") for name in files_of(hub.commits[0]))
    assert f"https://huggingface.co/{REPO_ID}" in capsys.readouterr().out


def test_train_py_push_is_this_push_and_not_trainers(shapes, pretrained_parts, hub, train_script, tmp_path):
    output_dir = tmp_path / "pushed"
    train_script.train(*training_arguments(shapes, pretrained_parts, output_dir, peft="cross_attention", max_steps=1,
                            push_to_hub=True, hub_model_id=REPO_ID, hub_private_repo=True))
    assert hub.folder_uploads == [], "Trainer's own push ran: its generic card would replace ours"
    assert [repo["repo_id"] for repo in hub.repos] == [REPO_ID] and hub.repos[0]["private"]
    files = files_of(hub.commits[0])
    assert "adapter_model.safetensors" in files and "base_model/model.safetensors" in files
    assert ModelCard(files["README.md"].decode()).data.library_name == "peft"


def test_train_py_push_without_a_token_stops_before_training(shapes, pretrained_parts, hub, logged_out, train_script,
                                                            tmp_path):
    output_dir = tmp_path / "not-started"
    with pytest.raises(HubPushError, match="hf auth login"):
        train_script.train(*training_arguments(shapes, pretrained_parts, output_dir, max_steps=1, push_to_hub=True,
                                hub_model_id=REPO_ID))
    assert not output_dir.exists()


def test_train_py_push_while_offline_stops_before_training(shapes, pretrained_parts, hub, train_script, tmp_path,
                                                           monkeypatch):
    """With HF_HUB_OFFLINE set the whole run trained, and only then did the push fail."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    output_dir = tmp_path / "not-started"
    with pytest.raises(HubPushError, match="cannot push while HF_HUB_OFFLINE is set"):
        train_script.train(*training_arguments(shapes, pretrained_parts, output_dir, max_steps=1, push_to_hub=True,
                                               hub_model_id=REPO_ID))
    assert not output_dir.exists()


def package_files() -> set[str]:
    package = REPO / "modeling_vitgpt2"
    return {f"modeling_vitgpt2/{path.relative_to(package).as_posix()}" for path in package.rglob("*")
            if path.suffix in (".py", ".md", ".yaml") and "__pycache__" not in path.parts}


def test_space_is_the_page_its_package_pinned_requirements_and_a_readme_naming_the_model(hub, tmp_path):
    from importlib import metadata

    from huggingface_hub import SpaceCard
    from packaging.version import Version

    from modeling_vitgpt2.applications.demo import space_model

    commit_info = push_space(REPO_ID, SPACE_ID, private=True)

    assert hub.repos == [{"repo_id": SPACE_ID, "private": True, "exist_ok": True, "token": "hf_test_token"}]
    assert hub.repo_options == [{"repo_type": "space", "space_sdk": "gradio"}]
    assert len(hub.commits) == 1 and hub.commits[0]["repo_type"] == "space" and commit_info.oid == "0123abcd"
    files = files_of(hub.commits[0])
    assert set(files) == {"app.py", "requirements.txt", "README.md"} | package_files()
    space = write_repository(hub.commits[0], tmp_path / "space")

    metadata_ = SpaceCard.load(space / "README.md").data
    assert (metadata_.sdk, metadata_.app_file, metadata_.models) == ("gradio", "app.py", [REPO_ID])
    assert metadata_.sdk_version == metadata.version("gradio")
    assert f"https://huggingface.co/{REPO_ID}" in SpaceCard.load(space / "README.md").text
    pins = dict(line.split("==") for line in (space / "requirements.txt").read_text().splitlines())
    assert {"torch", "transformers", "peft", "timm", "huggingface_hub"} <= set(pins) and "gradio" not in pins
    assert all(Version(metadata.version(name)).public == version for name, version in pins.items())  # tested here
    assert space_model(space) == REPO_ID  # the page, started in the Space, loads the model repository
    assert space_model(tmp_path) is None  # and outside a Space, the default


def test_space_requirements_pin_releases_not_local_builds(monkeypatch):
    """torch from download.pytorch.org reports `2.14.1+cu126`, a version PyPI has no release of: the Space failed to
    install."""
    from importlib import metadata

    from modeling_vitgpt2.applications.hub import space

    installed = metadata.version
    monkeypatch.setattr(space.metadata, "version",
                        lambda name: "2.14.1+cu126" if name == "torch" else installed(name))
    assert "torch==2.14.1\n" in space.space_requirements()


@pytest.mark.parametrize("run", ["full_run", "lora_run"])
def test_space_from_a_local_folder_carries_the_model_and_serves_its_captions(run, request, shapes, hub, tmp_path):
    gradio_client = pytest.importorskip("gradio_client", reason="needs the [test] extra")
    output_dir = request.getfixturevalue(run)
    push_space(output_dir, SPACE_ID)
    files = files_of(hub.commits[0])
    weights = "model/model.safetensors" if run == "full_run" else "model/base_model/model.safetensors"
    assert {weights, "model/README.md", "app.py"} <= set(files)
    assert f"https://huggingface.co/spaces/{SPACE_ID}" in files["model/README.md"].decode()
    space = write_repository(hub.commits[0], tmp_path / "space")

    # Started the way a Space starts it: `python app.py` in the repository, no arguments (but a free port).
    image = validation_images(shapes)[0]
    with serving_app(space / "app.py", [], cwd=space) as url:
        caption = gradio_client.Client(url, verbose=False).predict(
            gradio_client.handle_file(image), 3, 20, 1.0, ["all"], "mean", api_name="/caption")[0]
    model = load_for_inference(output_dir)  # the output folder where it was trained, as eval.py loads it
    processor = ViTGPT2Processor.from_pretrained(output_dir)
    expected = processor.batch_decode(model.generate(**processor(images=[image]), num_beams=3, max_new_tokens=20))
    assert caption == expected[0]


def test_model_card_links_the_space_when_one_is_given(full_run, hub, capsys):
    link = f"https://huggingface.co/spaces/{SPACE_ID}"
    assert link in build_model_card(full_run, REPO_ID, space_id=SPACE_ID).text
    assert "huggingface.co/spaces/" not in build_model_card(full_run, REPO_ID).text
    main(["push", str(full_run), "--repo_id", REPO_ID, "--space", SPACE_ID])
    assert link in files_of(hub.commits[0])["README.md"].decode()


def test_space_push_errors_say_what_to_do(hub, logged_out, monkeypatch, tmp_path, capsys):
    with pytest.raises(HubPushError, match="hf auth login"):
        push_space(REPO_ID, SPACE_ID)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with pytest.raises(ValueError, match="neither a folder here nor a Hub model id"):
        push_space(str(tmp_path / "no-such-run"), SPACE_ID)
    assert main(["space", REPO_ID, "--repo_id", "not a repo id"]) == 2
    assert "your-namespace/model-name" in capsys.readouterr().err
    assert hub.commits == []
