"""A whole (tiny) PEFT study in one call: shared feature cache, a failing variant, resumption, and a report whose
every number is what `eval.py score` computes on the variant's saved predictions."""

import contextlib
import csv
import dataclasses
import json
import re
import shutil
import threading

import pytest
import torch
import yaml

import eval as eval_cli
from conftest import REPO, build_tiny_tokenizer, tiny_config_kwargs
from modeling_vitgpt2 import ViTGPT2Config, ViTGPT2ForConditionalGeneration, ViTGPT2Processor
from modeling_vitgpt2.applications import study as study_module
from modeling_vitgpt2.applications.study import run as study_run
from modeling_vitgpt2.data.synthetic import draw_scene, random_scene
from modeling_vitgpt2.evaluation.metrics import format_metric, metric_names
from modeling_vitgpt2.model.modeling_vitgpt2 import ViTGPT2Encoder
from modeling_vitgpt2.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TRAIN_IMAGES, VAL_IMAGES, TOP_K = 12, 6, 1


@pytest.fixture(scope="module")
def study_file(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("study")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    model = ViTGPT2ForConditionalGeneration(ViTGPT2Config(**tiny_config_kwargs(tokenizer)))
    model.save_pretrained(root / "base")
    ViTGPT2Processor.from_timm_model(model.encoder.model, tokenizer).save_pretrained(root / "base")
    classes = root / "classes"
    classes.mkdir()
    import random

    for index in range(4):
        draw_scene(random_scene(random.Random(index)), 32).save(classes / f"{index % 2}_{index}.png")
    (root / "id2label.json").write_text(json.dumps({"0": "circle", "1": "square"}))
    spec = {
        "name": "tiny",
        "base": {"model": str(root / "base")},
        "data": {"synthetic_domain": "shifted", "synthetic_train_images": TRAIN_IMAGES,
                 "synthetic_val_images": VAL_IMAGES, "synthetic_image_size": 28, "max_caption_length": 24},
        "recipe": {"learning_rate": 0.01, "warmup_steps": 0, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 8,
                   "num_train_epochs": 2, "logging_steps": 1, "save_total_limit": None, "generation_num_beams": 2,
                   "generation_max_length": 12, "seed": 0, "dataloader_num_workers": 0},
        "variants": [{"name": "lora", "peft": "lora", "lora_rank": 2},
                     {"name": "cross", "peft": "cross_attention"},
                     {"name": "broken", "peft": "lora", "max_trainable_params": 1}],
        "clip_model": str(tiny_clip),
        "metrics": ["cider", "bleu", "rouge_l", "clip_score", "diversity", "copied"],  # METEOR: no JVM start here
        "zero_shot": {"images": str(classes), "labels": str(root / "id2label.json"),
                      "templates": ["a photo of a {object}.", "a {object}"], "ensemble": True},
        "extremes": {"top_k": TOP_K},
        "side_by_side": 2,
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finished_study(study_file, tmp_path_factory):
    """Runs the study once, counting the images the encoder sees."""
    encoded = []
    original = ViTGPT2Encoder.forward

    def counting(self, pixel_values, *args, **kwargs):
        encoded.append(pixel_values.shape[0])
        return original(self, pixel_values, *args, **kwargs)

    ViTGPT2Encoder.forward = counting
    try:
        output_dir = tmp_path_factory.mktemp("run") / "study"
        results = study_module.run_study(study_module.load_study(study_file), output_dir)
    finally:
        ViTGPT2Encoder.forward = original
    return output_dir, results, sum(encoded)


def test_frozen_encoder_variants_share_one_feature_cache(finished_study):
    output_dir, results, encoded_images = finished_study
    assert [row["status"] for row in results["rows"]] == ["ok", "ok", "ok", "failed"]
    # every training and validation image once for the whole study (base evaluation included), plus the extremes'
    # attention maps, which need the pixels
    assert encoded_images == TRAIN_IMAGES + VAL_IMAGES + 2 * TOP_K
    assert len(list((output_dir / "feature-cache").glob("encoder-features-*"))) == 1


def test_a_failing_variant_is_reported_and_the_others_still_run(finished_study, study_file, tmp_path, capsys):
    output_dir, results, _ = finished_study
    broken = results["rows"][-1]
    assert broken["name"] == "broken" and "max_trainable_params" in broken["error"]
    report = (output_dir / "report.md").read_text()
    assert "FAILED: ValueError: --peft lora trains" in report
    assert json.loads((output_dir / "variants" / "broken" / "study_result.json").read_text())["status"] == "failed"
    with open(output_dir / "results.csv") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["ok", "ok", "ok", "failed"]

    bad = tmp_path / "bad.yaml"
    spec = yaml.safe_load(study_file.read_text())
    spec["variants"][0]["lora_rnk"] = 4
    bad.write_text(yaml.safe_dump(spec))
    assert study_module.main([str(bad), "--output_dir", str(tmp_path / "out")]) == 2
    assert "variants[0] has keys that are not train.py arguments: ['lora_rnk']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_second_study_into_a_busy_folder_stops_before_writing(study_file, tmp_path, capsys, monkeypatch):
    # Two studies into one folder each failed a variant on the other's training lock and wrote a report saying so.
    import os

    from modeling_vitgpt2.training.checkpoints import hold_output_dir

    monkeypatch.setattr(study_run, "_run_study", lambda *args: pytest.fail("a second study ran"))
    folder = tmp_path / "out"
    with hold_output_dir(folder, job="study"):  # what a running study holds
        assert study_module.main([str(study_file), "--output_dir", str(folder)]) == 2
        assert [path.name for path in folder.iterdir()] == [".study.lock.0"]
    assert (f"{folder} is in use by another study (pid {os.getpid()}); wait for it to finish or choose another "
            "--output_dir") in capsys.readouterr().err
    assert list(folder.iterdir()) == [], "the holder's lock file outlived it"


def test_a_full_disk_stops_the_study_with_its_message_instead_of_failing_the_variant(study_file, tmp_path, capsys,
                                                                                     monkeypatch):
    # It was recorded as the variant's failure ("RuntimeError: [enforce fail at inline_container.cc:672] ...") and
    # the study went on to fail every later variant the same way.
    from modeling_vitgpt2.training import run as training
    from modeling_vitgpt2.utils.io import DiskFullError

    def full_disk(model_args, data_args, peft_args, training_args, callbacks=None):
        raise DiskFullError(f"{training_args.output_dir}/checkpoint-2", 123_456)

    monkeypatch.setattr(training, "run_training", full_disk)
    monkeypatch.setattr(study_run, "_evaluate_base", lambda *args: {"name": "base", "status": "ok"})
    folder = tmp_path / "out"
    assert study_module.main([str(study_file), "--output_dir", str(folder), "--quiet"]) == 2
    assert re.search(rf"no space left on \S+ writing {re.escape(str(folder))}/variants/lora/checkpoint-2, about "
                     r"123,456 bytes needed", capsys.readouterr().err)
    assert not (folder / "variants" / "lora" / "study_result.json").exists()
    assert not (folder / "variants" / "cross").exists()


def test_variant_names_that_differ_only_in_case_are_refused(study_file, tmp_path, capsys):
    # Each names a folder: on macOS and Windows `LoRA/` is `lora/`, and `Base/` the base model's row.
    spec = yaml.safe_load(study_file.read_text())
    for names, message in ((["lora", "LoRA"], "variants[1].name 'LoRA' is used twice"),
                           (["Base"], "variants[0].name 'Base' must be a folder-safe name")):
        spec["variants"] = [{"name": name, "peft": "lora"} for name in names]
        (tmp_path / "cased.yaml").write_text(yaml.safe_dump(spec))
        assert study_module.main([str(tmp_path / "cased.yaml"), "--output_dir", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_study_name_that_is_a_path_is_refused(study_file, tmp_path, capsys, monkeypatch):
    # The name makes the default output folder, outputs/study-<name>: "../x" wrote the whole study elsewhere.
    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load(study_file.read_text())
    for name in ("../../../../elsewhere/x", "a/b", ".hidden"):
        spec["name"] = name
        (tmp_path / "named.yaml").write_text(yaml.safe_dump(spec))
        assert study_module.main([str(tmp_path / "named.yaml")]) == 2
        assert f"'name' {name!r} must be a folder-safe name (letters, digits, _ . -)" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["named.yaml"]


def test_every_reported_number_is_what_eval_py_score_computes(finished_study, tmp_path, capsys):
    output_dir, results, _ = finished_study
    data = output_dir / "data"
    report = (output_dir / "report.md").read_text()
    html = (output_dir / "report.html").read_text()
    names = metric_names()
    for row in results["rows"][:3]:
        scores_file = tmp_path / f"{row['name']}.json"
        assert eval_cli.main(["score", "--predictions", str(output_dir / "variants" / row["name"] /
                                                               "eval_predictions.json"),
                              "--annotations", str(data / "val.json"), "--images", str(data / "val"),
                              "--clip_model", results["clip_model"], "--train_annotations", str(data / "train.json"),
                              "--output", str(scores_file)]) == 0
        scored = json.loads(scores_file.read_text())
        for key, value in row["metrics"].items():
            assert value == scored["metrics"][key], (row["name"], key)
        assert {"cider", "bleu_4", "rouge_l", "clip_score", "distinct_1", "copied_from_training"} <= set(row["metrics"])
        table_line = next(line for line in report.splitlines() if line.startswith(f"| {row['name']} |"))
        for key in ("cider", "clip_score", "bleu_4", "rouge_l"):
            assert f"| {format_metric(key, scored['metrics'][key])} |" in table_line, (row["name"], key)
            assert f"<td>{format_metric(key, scored['metrics'][key])}</td>" in html
    capsys.readouterr()
    header = next(line for line in report.splitlines() if line.startswith("| Variant |"))
    for column in ("Trainable %", names["cider"], names["clip_score"], names["bleu_4"], names["rouge_l"],
                   "Train time", "Peak memory", "Best epoch"):
        assert f"| {column} |" in header
    assert report.splitlines().index(header) + 2 == report.splitlines().index(
        next(line for line in report.splitlines() if line.startswith("| base |")))  # the base model is row one
    assert "| a photo of a {object}. |" in report and "| ensemble |" in report.lower()
    for figure in ("cider_vs_parameters", "val_cider_per_epoch", "train_loss"):
        assert (output_dir / "figures" / f"{figure}.png").is_file()
        assert f"figures/{figure}.png" in report
    assert "src=\"data:image/png;base64," in html and "figures/" not in html  # self-contained
    extremes = results["extremes"]
    assert extremes["by"] == "clip_score" and len(extremes["best"]) == len(extremes["worst"]) == TOP_K
    assert all((output_dir / entry["png"]).is_file() for entry in extremes["best"] + extremes["worst"])
    side = results["side_by_side"]
    assert len(side) == 2 and set(side[0]["captions"]) == {"base", "lora", "cross"} and side[0]["references"]
    assert results["rows"][1]["log_history"] and results["rows"][1]["best_epoch"] in (1, 2)


def test_rerun_skips_finished_variants_and_resumes_an_interrupted_one(finished_study, study_file, monkeypatch):
    output_dir, first, _ = finished_study
    cross = output_dir / "variants" / "cross"
    checkpoints = sorted(cross.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert len(checkpoints) == 2
    # as if killed during its second epoch: the first checkpoint complete, nothing after it
    shutil.rmtree(checkpoints[1])
    for leftover in ("study_result.json", "eval_predictions.json", "scores.json", "adapter_model.safetensors"):
        (cross / leftover).unlink()

    calls = []
    from modeling_vitgpt2.training import run as training

    original = training.run_training

    def spy(model_args, data_args, peft_args, training_args, callbacks=None):
        calls.append((training_args.output_dir, training_args.resume_from_checkpoint))
        return original(model_args, data_args, peft_args, training_args, callbacks=callbacks)

    monkeypatch.setattr(training, "run_training", spy)  # the study imports it at call time
    second = study_module.run_study(study_module.load_study(study_file), output_dir, show_progress=False)
    assert calls[0] == (str(cross), str(checkpoints[0]))
    assert [call[0] for call in calls] == [str(cross), str(output_dir / "variants" / "broken")]  # failed: retried
    rows = {row["name"]: row for row in second["rows"]}
    assert rows["lora"] == {row["name"]: row for row in first["rows"]}["lora"]
    assert rows["cross"]["status"] == "ok" and rows["cross"]["resumed_from"] == str(checkpoints[0])
    assert (cross / "eval_predictions.json").is_file()


def test_rows_made_from_input_files_that_changed_since_are_made_again(finished_study, study_file, tmp_path, capsys,
                                                                       monkeypatch):
    """A base model retrained in its folder, or captions edited in place, leave the study file as it was: the rows
    made from the old files said "already finished, skipped" and were reported with the new ones."""
    output_dir, _, _ = finished_study
    copy = tmp_path / "study"
    shutil.copytree(output_dir, copy)
    records = sorted(copy.glob("variants/*/study_settings.json"))
    for record in records:  # as an earlier version wrote them, before input files were hashed
        settings = json.loads(record.read_text())
        del settings["inputs"]
        record.write_text(json.dumps(settings))

    stale = copy / "extremes" / "best_9_of_an_earlier_run_attention.png"  # e.g. drawn with a larger top_k
    stale.write_bytes(b"")

    calls = []
    from modeling_vitgpt2.training import run as training

    def not_trained(model_args, data_args, peft_args, training_args, callbacks=None):
        calls.append(training_args.output_dir.rsplit("/", 1)[-1])
        raise RuntimeError("not trained in this test")

    monkeypatch.setattr(training, "run_training", not_trained)
    study_module.run_study(study_module.load_study(study_file), copy)
    assert calls == ["broken"]  # trusted once (only the failed row runs again, as always)...
    assert all({"train_json", "val_json"} <= set(json.loads(record.read_text())["inputs"]) for record in records)

    assert not stale.exists()  # the extremes were drawn again: only this run's maps stay

    validation = copy / "data" / "val.json"  # ...and from then on checked
    content = json.loads(validation.read_text())
    content["annotations"][0]["caption"] += " again"
    validation.write_text(json.dumps(content))
    calls.clear()
    capsys.readouterr()
    study_module.run_study(study_module.load_study(study_file), copy)
    assert "variant 1/3 lora: settings changed since its last run: val_json" in capsys.readouterr().out
    assert sorted(calls) == ["broken", "cross", "lora"]


def test_an_edited_study_reruns_the_variants_whose_settings_changed(finished_study, study_file, tmp_path, capsys,
                                                                   monkeypatch):
    # It said "already finished, skipped" and reported the old lora_rank beside the new study file.
    output_dir, _, _ = finished_study
    copy = tmp_path / "study"
    shutil.copytree(output_dir, copy)
    cross_before = json.loads((copy / "variants" / "cross" / "study_result.json").read_text())
    spec = yaml.safe_load(study_file.read_text())
    spec["variants"][0]["lora_rank"] = 4
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(spec))

    calls = []
    from modeling_vitgpt2.training import run as training

    original = training.run_training

    def spy(model_args, data_args, peft_args, training_args, callbacks=None):
        calls.append((training_args.output_dir, training_args.resume_from_checkpoint))
        return original(model_args, data_args, peft_args, training_args, callbacks=callbacks)

    monkeypatch.setattr(training, "run_training", spy)
    capsys.readouterr()
    second = study_module.run_study(study_module.load_study(edited), copy)
    assert "variant 1/3 lora: settings changed since its last run: lora_rank 2 -> 4; running it again" in \
        capsys.readouterr().out
    assert calls == [(str(copy / "variants" / "lora"), None), (str(copy / "variants" / "broken"), None)]
    rows = {row["name"]: row for row in second["rows"]}
    assert rows["lora"]["status"] == "ok" and rows["lora"]["settings"] == {"peft": "lora", "lora_rank": 4}
    assert rows["cross"] == cross_before  # unchanged: kept
    report_line = next(line for line in (copy / "report.md").read_text().splitlines() if line.startswith("| lora |"))
    assert "lora_rank=4" in report_line
    recorded = json.loads((copy / "variants" / "lora" / "study_settings.json").read_text())
    assert recorded["training"]["lora_rank"] == 4


def test_the_extremes_are_drawn_with_the_recipes_generation_settings(finished_study, study_file, tmp_path,
                                                                     monkeypatch):
    """The attention maps caption the best and worst images again with the settings the variant's predictions were
    made with: `max_new_tokens` included."""
    output_dir, results, _ = finished_study
    copy = tmp_path / "study"
    shutil.copytree(output_dir, copy)
    study = study_module.load_study(study_file)
    study = dataclasses.replace(study, recipe={**study.recipe, "max_new_tokens": 1})
    from modeling_vitgpt2.evaluation import jobs

    drawn = []
    original = jobs.compute_attention_maps

    def spy(*args, **kwargs):
        drawn.extend(original(*args, **kwargs))
        return drawn[-len(args[2]):]

    monkeypatch.setattr(jobs, "compute_attention_maps", spy)
    quiet = study_module.StudyProgress(0, enabled=False)
    with contextlib.ExitStack() as held:
        data = study_run._prepare_data(study, copy, quiet, held)
        summary = study_run._extremes(study, results["rows"], data, copy, quiet)
    assert len(drawn) == len(summary["best"] + summary["worst"]) == 2 * TOP_K
    assert all(len(result.token_ids) == 1 for result in drawn)


def test_shipped_studies_load(tmp_path, monkeypatch):
    from transformers.utils import is_torch_bf16_gpu_available

    builtin = study_module.load_study(study_module.BUILTIN_STUDY)
    assert [name for name, _ in builtin.variants] == [
        "lora_r4", "lora_r8", "adapter_64", "prefix_100", "cross_attention", "full"]
    assert builtin.data["synthetic_domain"] == "shifted" and builtin.base["model"] == "outputs/synthetic-default"
    # The course study reads its zero-shot folder from where it runs (checked before anything runs), and its recipe
    # asks for bf16, which train.py refuses without a GPU that has it: as the recipe's comment says, drop it there.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hw3_data" / "p1_data" / "val").mkdir(parents=True)
    (tmp_path / "hw3_data" / "p1_data" / "id2label.json").write_text('{"0": "apple"}')
    course_file = REPO / "configs" / "studies" / "course_peft.yaml"
    if not is_torch_bf16_gpu_available():
        with pytest.raises(study_module.StudyConfigError, match="'recipe' with 'data' and 'base' does not make "
                                                                "train.py arguments that work: .*bf16"):
            study_module.load_study(course_file)
        spec = yaml.safe_load(course_file.read_text())
        del spec["recipe"]["bf16"]
        course_file = tmp_path / "course_peft.yaml"
        course_file.write_text(yaml.safe_dump(spec))
    course = study_module.load_study(course_file)
    assert [(name, overrides["peft"]) for name, overrides in course.variants] == [
        ("lora_r4", "lora"), ("lora_r8", "lora"), ("adapter_64", "adapter"), ("prefix_100", "prefix")]
    assert course.zero_shot["templates"] == [
        "This is a photo of {object}", "This is not a photo of {object}", "No {object}, no score."]


def test_a_missing_base_is_trained_first_with_its_train_config(tmp_path):
    base_config = {"synthetic_dir": str(tmp_path / "shapes"), "synthetic_train_images": 8, "synthetic_val_images": 4,
                   "synthetic_image_size": 28, "tokenizer_vocab_size": 300, "num_train_epochs": 1,
                   "per_device_train_batch_size": 16, "generation_num_beams": 1, "generation_max_length": 8,
                   "model_config": {"encoder_kwargs": {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 1,
                                                       "num_heads": 2},
                                    "encoder_hidden_size": 32, "n_embd": 32, "n_layer": 1, "n_head": 2},
                   "report_to": "none", "disable_tqdm": True}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base_config))
    spec = {"base": {"model": str(tmp_path / "base"), "train_config": str(tmp_path / "base.yaml")},
            "data": {"synthetic_domain": "shifted", "synthetic_train_images": 4, "synthetic_val_images": 2,
                     "synthetic_image_size": 28},
            "recipe": {"num_train_epochs": 1, "generation_num_beams": 1, "generation_max_length": 8,
                       "save_strategy": "no", "load_best_model_at_end": False},
            "variants": [{"name": "cross", "peft": "cross_attention"}], "side_by_side": 0, "metrics": ["cider"]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    results = study_module.run_study(study_module.load_study(tmp_path / "study.yaml"), tmp_path / "out",
                                     show_progress=False)
    assert (tmp_path / "base" / "config.json").is_file()
    assert json.loads((tmp_path / "base" / "training_summary.json").read_text())["sources"]["synthetic_data"]
    assert [row["status"] for row in results["rows"]] == ["ok", "ok"]


def _study(tmp_path, **changes):
    """A small study file that loads (no model is read before the study runs), with `changes` to its fields."""
    spec = {"base": {"model": str(tmp_path / "base")}, "recipe": {"num_train_epochs": 1},
            "variants": [{"name": "lora", "peft": "lora"}, {"name": "cross", "peft": "cross_attention"}],
            "metrics": ["cider", "bleu"], **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"variants": [{"name": "lora", "peft": "lorra"}]}, "variants[0].peft unknown PEFT method 'lorra': registered are lora,"),
    ({"variants": [{"name": "lora", "peft": "lora", "lora_rank": "four"}]},
     "variants[0].lora_rank has invalid int value: 'four'"),
    ({"recipe": {"num_train_epochs": "three"}}, "recipe.num_train_epochs has invalid float value: 'three'"),
    ({"variants": [{"name": "lora", "train_encoder": "maybe"}]}, "variants[0].train_encoder has Truthy value expected"),
    ({"recipe": {"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "no"}},
     "'recipe' with 'data' and 'base' does not make train.py arguments that work: "),
    ({"variants": [{"name": "lora", "output_dir": "elsewhere"}]}, "variants[0].output_dir is set by the study for each row"),
])
def test_variant_values_are_checked_as_train_py_checks_a_config_file_before_anything_runs(tmp_path, changes,
                                                                                          message):
    # An unknown method or a rank of "four" stopped only that variant, after the ones before it had trained.
    with pytest.raises(study_module.StudyConfigError) as error:
        study_module.load_study(_study(tmp_path, **changes))
    assert str(error.value).startswith(f"study file {tmp_path / 'study.yaml'}: {message}")


def test_a_yaml_float_without_a_dot_trains_with_its_value_as_in_a_train_py_config(tmp_path, capsys, monkeypatch):
    # PyYAML reads `learning_rate: 1e-2` as the string '1e-2': train.py's config file converts it, the study passed
    # the string on to Trainer.
    from modeling_vitgpt2.training import run as training
    from modeling_vitgpt2.utils.io import DiskFullError

    path = _study(tmp_path, data={"synthetic_train_images": 2, "synthetic_val_images": 2, "synthetic_image_size": 28})
    path.write_text(path.read_text().replace("num_train_epochs: 1", "num_train_epochs: 1\n  learning_rate: 1e-2"))
    assert study_module.load_study(path).recipe["learning_rate"] == "1e-2"
    learning_rates = []

    def stop(model_args, data_args, peft_args, training_args, callbacks=None):
        learning_rates.append(training_args.learning_rate)
        raise DiskFullError(training_args.output_dir, 1)  # stops the study here

    monkeypatch.setattr(training, "run_training", stop)
    monkeypatch.setattr(study_run, "_evaluate_base", lambda *args: {"name": "base", "status": "ok"})
    assert study_module.main([str(path), "--output_dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert learning_rates == [0.01]


@pytest.mark.parametrize("changes", [{"metrics": ["bleu", "rouge_l"]}, {"metrics": []},
                                     {"metrics": ["bleu", "clip_score"]}])
def test_metrics_the_best_and_worst_captions_cannot_be_ranked_by_are_refused(tmp_path, changes):
    # Every variant trained, then the study stopped on KeyError 'cider' with no report.
    with pytest.raises(study_module.StudyConfigError, match="'metrics' must include cider, or clip_score with a "
                                                            "clip_model: the best and worst captions are ranked"):
        study_module.load_study(_study(tmp_path, **changes))
    assert study_module.load_study(_study(tmp_path, metrics=["clip_score"], clip_model="clip")).metrics == [
        "clip_score"]


@pytest.mark.parametrize("changes, message", [
    ({"extremes": {"top_k": "two"}}, "'extremes.top_k' must be a number of images (1 or more)"),
    ({"extremes": {"top_k": -1}}, "'extremes.top_k' must be a number of images (1 or more)"),
    ({"extremes": {"top_k": True}}, "'extremes.top_k' must be a number of images (1 or more)"),
    ({"extremes": {"layer": "last"}}, "'extremes.layer' must be a decoder layer (0-based), a list of them or 'all'"),
    ({"extremes": {"layer": [2, -1]}}, "'extremes.layer' must be a decoder layer (0-based), a list of them or 'all'"),
    ({"extremes": {"layer": []}}, "'extremes.layer' must be a decoder layer (0-based), a list of them or 'all'"),
    ({"extremes": {"variant": ["cross"]}}, "'extremes.variant' ['cross'] is not one of the variants ['cross', 'lora']"),
    ({"variants": [{"name": "LoRA", "peft": "lora"}], "extremes": {"variant": "lora"}},
     "'extremes.variant' 'lora' is not one of the variants ['LoRA']"),  # names a row: drew nothing
    ({"metrics": [["cider"]]}, "'metrics' must be a list of registered metrics"),
    ({"side_by_side": True}, "'side_by_side' must be a number of images (0 or more)"),
    ({"clip_prefix": ["A photo depicts"]}, "'clip_prefix' must be a string"),
])
def test_extremes_and_other_fields_of_the_wrong_type_are_refused(tmp_path, changes, message):
    # top_k "two" stopped the study after training; -1 drew all but one image as both best and worst; a list where a
    # name belongs escaped as "TypeError: unhashable type: 'list'".
    with pytest.raises(study_module.StudyConfigError) as error:
        study_module.load_study(_study(tmp_path, **changes))
    assert str(error.value).startswith(f"study file {tmp_path / 'study.yaml'}: {message}")


@pytest.mark.parametrize("change, message", [
    ({"templates": "a photo of a {object}"}, "'zero_shot.templates' templates must be a list of strings"),
    ({"templates": ["a photo"]}, "'zero_shot.templates' prompt template 'a photo' has no {object} placeholder"),
    ({"ensamble": False}, "'zero_shot' has unknown keys ['ensamble']"),
    ({"images": "missing"}, "'zero_shot.images' missing is not a folder"),
    ({"labels": "missing.json"}, "'zero_shot.labels' missing.json is not a file"),
    ({"labels_file": "missing.csv"}, "'zero_shot.labels_file' missing.csv is not a file"),
])
def test_a_zero_shot_section_is_checked_before_anything_runs(tmp_path, monkeypatch, change, message):
    # A single string was split into one template per character, a typo'd key ignored, and a missing folder found
    # only after every variant had trained. Paths are relative to where the study runs, as the data's are.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "classes").mkdir()
    (tmp_path / "id2label.json").write_text('{"0": "circle"}')
    zero_shot = {"images": "classes", "labels": "id2label.json", "templates": ["a {object}"], "ensemble": True}
    assert study_module.load_study(_study(tmp_path, zero_shot=zero_shot, clip_model="clip")).zero_shot == zero_shot
    with pytest.raises(study_module.StudyConfigError) as error:
        study_module.load_study(_study(tmp_path, zero_shot={**zero_shot, **change}, clip_model="clip"))
    assert str(error.value).startswith(f"study file {tmp_path / 'study.yaml'}: {message}")


def test_a_multi_line_error_stays_in_its_table_row(tmp_path):
    # The error's second line broke report.md's table; with no measured row it said "peak memory is the .".
    machine = {"platform": "linux", "processor": "cpu", "cpu_cores": 2, "load_average": None, "cpu_threads": 1,
               "gpu": None, "torch": torch.__version__}
    rows = [{"name": "base", "status": "ok", "settings": {"model": "before fine-tuning"}, "method": "none",
             "trainable_parameters": 0, "total_parameters": 10, "train_runtime_s": 0.0, "peak_memory_bytes": None,
             "peak_memory_kind": "", "best_epoch": None, "log_history": [], "metrics": {"cider": 0.5}, "skipped": {}},
            {"name": "lora", "status": "failed", "settings": {"peft": "lora"},
             "error": "OutOfMemoryError: CUDA out of memory.\nGPU 0 has a total capacity of 79.1 GiB"}]
    study_module.write_report({"study": "s", "study_file": "s.yaml", "output_dir": str(tmp_path), "clip_model": None,
                               "rows": rows, "zero_shot": None, "extremes": None, "side_by_side": [],
                               "machine": machine, "study_wall_time_s": 1.0}, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| FAILED: OutOfMemoryError: CUDA out of memory. GPU 0 has a total capacity of 79.1 GiB |" in next(
        line for line in report.splitlines() if line.startswith("| lora |"))
    assert "peak memory is the" not in report


class _Lines(study_module.StudyProgress):
    """Progress that keeps its lines, and says when the study starts to wait for another one."""

    def __init__(self, total: int = 0):
        super().__init__(total, enabled=False)
        self.lines: list[str] = []
        self.waiting = threading.Event()

    def say(self, message: str) -> None:
        self.lines.append(message)
        if message.startswith("waiting"):
            self.waiting.set()


def _synthetic_study(tmp_path, root, **data):
    return study_module.load_study(_study(tmp_path, data={
        "synthetic_dir": str(root), "synthetic_train_images": 2, "synthetic_val_images": 2, "synthetic_image_size": 28,
        **data}))


def test_studies_that_share_a_synthetic_dir_write_it_once_and_the_second_waits_for_it(tmp_path, monkeypatch):
    # Both wrote the same files at once, and either could train on a set the other was half-way through writing.
    from modeling_vitgpt2.data import synthetic

    root = tmp_path / "shared"
    study = _synthetic_study(tmp_path, root)
    second = _Lines()
    original, writers, writing = synthetic.write_synthetic_coco, [], threading.Event()

    def slow_write(*args, **kwargs):  # still writing when the second study arrives
        writers.append(threading.current_thread().name)
        writing.set()
        if not second.waiting.wait(timeout=10):
            raise AssertionError("the second study did not wait for the first one's writing")
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_synthetic_coco", slow_write)
    first = {}

    def first_study():
        with contextlib.ExitStack() as held:
            first["data"] = study_run._prepare_data(study, tmp_path / "first", _Lines(), held)

    thread = threading.Thread(target=first_study, name="first")
    thread.start()
    assert writing.wait(timeout=10)
    with contextlib.ExitStack() as held:
        data = study_run._prepare_data(study, tmp_path / "second", second, held)
    thread.join(timeout=10)
    assert writers == ["first"]
    assert second.lines == [f"waiting for another study or training run to finish writing the synthetic set in {root}"]
    assert data == first["data"] and len(json.loads((root / "val.json").read_text())["images"]) == 2


def test_a_synthetic_set_another_study_trains_on_is_not_rewritten_with_other_options(tmp_path, monkeypatch):
    from modeling_vitgpt2.data import synthetic

    root = tmp_path / "shared"
    quiet = study_module.StudyProgress(0, enabled=False)
    other = _synthetic_study(tmp_path, root, synthetic_val_images=3)
    with contextlib.ExitStack() as held:
        study_run._prepare_data(_synthetic_study(tmp_path, root), tmp_path, quiet, held)
        marker = (root / "written.json").read_text()
        with pytest.raises(UserError, match=rf"{re.escape(str(root))} holds the synthetic set of another running "
                                            r"study or training run .*; writing this study's .*: wait for that one "
                                            r"to finish, or set data.synthetic_dir"):
            study_run._prepare_data(other, tmp_path, quiet, contextlib.ExitStack())
        assert (root / "written.json").read_text() == marker

    original = synthetic.write_synthetic_coco

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_synthetic_coco", killed)
    with pytest.raises(KeyboardInterrupt), contextlib.ExitStack() as held:  # once the first study ended
        study_run._prepare_data(other, tmp_path, quiet, held)
    assert not (root / "written.json").exists(), "a half-rewritten set still passes for the one before"
    monkeypatch.setattr(synthetic, "write_synthetic_coco", original)
    with contextlib.ExitStack() as held:
        study_run._prepare_data(other, tmp_path, quiet, held)
    assert len(json.loads((root / "val.json").read_text())["images"]) == 3


def test_a_rerun_in_which_no_variant_finishes_shows_no_earlier_attention_maps(finished_study, study_file, tmp_path,
                                                                             capsys, monkeypatch):
    # The report showed the previous run's best and worst captions beside this run's failures.
    output_dir, _, _ = finished_study
    copy = tmp_path / "study"
    shutil.copytree(output_dir, copy)
    for name in ("lora", "cross"):
        (copy / "variants" / name / "study_result.json").unlink()
    from modeling_vitgpt2.training import run as training

    def failing(model_args, data_args, peft_args, training_args, callbacks=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(training, "run_training", failing)
    capsys.readouterr()
    results = study_module.run_study(study_module.load_study(study_file), copy)
    assert [row["status"] for row in results["rows"]] == ["ok", "failed", "failed", "failed"]
    assert f"extremes: not drawn: no variant finished in this run; deleted the earlier run's maps in {copy}/extremes" \
        in capsys.readouterr().out
    assert not (copy / "extremes").exists()
    assert results["extremes"] == {"not_drawn": "no variant finished in this run"}
    report = (copy / "report.md").read_text()
    assert "Not drawn: no variant finished in this run (see the Status column above)" in report
    assert "extremes/" not in report and "best 1 attention maps" not in (copy / "report.html").read_text()


def _copy_as_scored_without_clip(output_dir, copy):
    """The base and lora rows of `output_dir` in `copy`, as made before the study had a CLIP model."""
    for part in ("data", "variants/base", "variants/lora"):
        shutil.copytree(output_dir / part, copy / part)
    for name in ("base", "lora"):
        record = copy / "variants" / name / "study_settings.json"
        settings = json.loads(record.read_text())
        settings["scoring"].update(clip_model=None, metrics=[m for m in settings["scoring"]["metrics"]
                                                             if m != "clip_score"])
        if name == "lora":
            del settings["inputs"]  # and by a version that did not hash input files yet
        record.write_text(json.dumps(settings))
        result = copy / "variants" / name / "study_result.json"
        content = json.loads(result.read_text())
        del content["metrics"]["clip_score"]
        result.write_text(json.dumps(content))


def test_a_scoring_setting_added_to_trained_rows_rescores_them_without_training(finished_study, study_file, tmp_path,
                                                                                 monkeypatch):
    # Adding a clip_model to a study whose rows had trained retrained every row: the scoring settings were part of
    # the row's identity.
    output_dir, first, _ = finished_study
    rows = {row["name"]: row for row in first["rows"]}
    copy = tmp_path / "study"
    _copy_as_scored_without_clip(output_dir, copy)
    from modeling_vitgpt2.evaluation.clip_score import load_clip
    from modeling_vitgpt2.training import run as training

    def not_again(*args, **kwargs):
        raise AssertionError("a row whose training settings are unchanged was trained or evaluated again")

    monkeypatch.setattr(training, "run_training", not_again)
    monkeypatch.setattr(training, "build_processor_and_model", not_again)
    study = study_module.load_study(study_file)
    progress = _Lines(total=3)
    clip = load_clip(study.clip_model)
    with contextlib.ExitStack() as held:
        data = study_run._prepare_data(study, copy, progress, held)
        assert study_run._evaluate_base(study, data, copy, clip, progress) == rows["base"]
        assert study_run.run_variant(study, 1, "lora", dict(study.variants)["lora"], data, copy, clip,
                                     progress) == rows["lora"]  # the same predictions and CLIP model: its scores
    assert progress.lines[-1] == "variant 1/3 lora: already finished, skipped"
    rescored = [line for line in progress.lines if "scoring settings changed" in line]
    assert [line.split(":")[0] for line in rescored] == ["base model", "variant 1/3 lora"]
    assert all(f"clip_model None -> '{study.clip_model}'" in line and
               line.endswith("; scoring its saved predictions again (not retrained)") for line in rescored)
    for name, overrides in (("base", {}), ("lora", dict(study.variants)["lora"])):
        assert json.loads((copy / "variants" / name / "study_settings.json").read_text()) == study_run._settings(
            study, overrides, data)
        assert "clip_score" in json.loads((copy / "variants" / name / "scores.json").read_text())["metrics"]


def test_a_row_whose_saved_predictions_cannot_be_rescored_is_made_again_and_the_study_goes_on(
        finished_study, study_file, tmp_path, monkeypatch):
    # A deleted or damaged eval_predictions.json stopped the whole study with FileNotFoundError, on every rerun.
    output_dir, first, _ = finished_study
    copy = tmp_path / "study"
    _copy_as_scored_without_clip(output_dir, copy)
    (copy / "variants" / "lora" / "eval_predictions.json").unlink()
    (copy / "variants" / "base" / "eval_predictions.json").write_text('{"train_000001": "a red')  # cut short
    from modeling_vitgpt2.evaluation.clip_score import load_clip
    from modeling_vitgpt2.training import run as training

    trained = []

    def training_again(model_args, data_args, peft_args, training_args, callbacks=None):
        trained.append(training_args.output_dir)
        raise RuntimeError("stopped here: the test only checks that the row trains again")

    monkeypatch.setattr(training, "run_training", training_again)
    study = study_module.load_study(study_file)
    progress = _Lines(total=3)
    clip = load_clip(study.clip_model)
    lora, base = copy / "variants" / "lora", copy / "variants" / "base"
    with contextlib.ExitStack() as held:
        data = study_run._prepare_data(study, copy, progress, held)
        base_row = study_run._evaluate_base(study, data, copy, clip, progress)  # evaluated again, for real
        lora_row = study_run.run_variant(study, 1, "lora", dict(study.variants)["lora"], data, copy, clip, progress)
    assert base_row["status"] == "ok" and "clip_score" in base_row["metrics"]
    assert json.loads((base / "eval_predictions.json").read_text()).keys() == \
        json.loads((output_dir / "variants" / "base" / "eval_predictions.json").read_text()).keys()
    assert trained == [str(lora)] and lora_row["status"] == "failed" and "stopped here" in lora_row["error"]
    assert list((output_dir / "variants" / "lora").glob("checkpoint-*"))
    assert not list(lora.glob("checkpoint-*")), "the row's earlier checkpoints were resumed from"
    for folder, label, error in ((base, "base model", "JSONDecodeError|InvalidJSONError"),
                                 (lora, "variant 1/3 lora", "FileNotFoundError")):
        assert any(re.fullmatch(rf"{label}: cannot score its saved predictions \(({error}): .*\); deleting "
                                rf"{re.escape(str(folder))} and running it again", line)
                   for line in progress.lines), progress.lines
    assert json.loads((lora / "study_settings.json").read_text()) == study_run._settings(
        study, dict(study.variants)["lora"], data)  # so a rerun trains it as a new row, not a rescore
