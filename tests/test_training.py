"""Training through `Trainer` with every PEFT method, on tiny models built from local "pretrained" parts.

Each run goes through `run_training`, the function behind `train.py`, with the same argument dataclasses.
"""

import json

import pytest
import torch
from peft import PeftModel

from conftest import save_tiny_clip, training_arguments
from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2Processor
from modeling_vitgpt2.inference.loading import load_for_inference
from modeling_vitgpt2.training.run import run_training


def captions_of(model, processor, shapes):
    images = sorted(shapes.val_images.iterdir())
    pixel_values = processor(images=images)["pixel_values"]
    return processor.batch_decode(model.generate(pixel_values=pixel_values, num_beams=2, max_length=12))


@pytest.mark.parametrize("peft", ["lora", "adapter", "prefix", "cross_attention", "full"])
def test_every_method_trains_saves_and_reloads_to_identical_captions(shapes, pretrained_parts, tmp_path, peft):
    output_dir = tmp_path / peft
    args = training_arguments(shapes, pretrained_parts, output_dir, peft=peft, save_strategy="steps", save_steps=8)
    metrics = run_training(*args)

    losses = [entry["loss"] for entry in json.loads(
        (output_dir / "checkpoint-8" / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert "eval_cider" in metrics
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_cider"] == pytest.approx(metrics["eval_cider"])
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["peft_method"] == peft and 0 < summary["trainable_parameters"] < summary["total_parameters"]

    processor = ViTGPT2Processor.from_pretrained(output_dir)
    predictions = json.loads((output_dir / "eval_predictions.json").read_text())
    if peft == "full":
        assert (output_dir / "model.safetensors").is_file()
        reloaded = ViTGPT2ForConditionalGeneration.from_pretrained(output_dir).eval()
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in output_dir.iterdir()}
        config = json.loads((output_dir / "adapter_config.json").read_text())
        base = ViTGPT2ForConditionalGeneration.from_pretrained(config["base_model_name_or_path"])
        reloaded = PeftModel.from_pretrained(base, output_dir).eval()
        from safetensors import safe_open

        with safe_open(output_dir / "adapter_model.safetensors", "pt") as saved:
            assert any("crossattention" in key for key in saved.keys())
    sorted_names = sorted(path.stem for path in shapes.val_images.iterdir())
    assert captions_of(reloaded, processor, shapes) == [predictions[name] for name in sorted_names]
    assert captions_of(load_for_inference(output_dir), processor, shapes) == [predictions[n] for n in sorted_names]


def test_merged_adapter_gives_the_same_captions_as_the_adapter(shapes, pretrained_parts, tmp_path):
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    run_training(*training_arguments(shapes, pretrained_parts, adapter_dir, peft="lora", max_steps=3))
    run_training(*training_arguments(shapes, pretrained_parts, merged_dir, peft="lora", max_steps=3, merge=True))
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    processor = ViTGPT2Processor.from_pretrained(merged_dir)
    merged = ViTGPT2ForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert captions_of(merged, processor, shapes) == captions_of(load_for_inference(adapter_dir), processor, shapes)


def test_prefix_reaches_generation(shapes, pretrained_parts, tmp_path):
    output_dir = tmp_path / "prefix"
    run_training(*training_arguments(shapes, pretrained_parts, output_dir, peft="prefix", max_steps=2))
    model = load_for_inference(output_dir)
    processor = ViTGPT2Processor.from_pretrained(output_dir)
    before = captions_of(model, processor, shapes)
    prefix = model.get_base_model().decoder.prefix
    trained_copy = [p for n, p in model.named_parameters() if "prefix.modules_to_save" in n]
    assert trained_copy, "the trained prefix must be the one peft saves and loads"
    with torch.no_grad():
        trained_copy[0].mul_(-40.0)
    after = captions_of(model, processor, shapes)
    assert before != after
    assert prefix is not None


def test_too_many_trainable_parameters_refuse_to_start(shapes, pretrained_parts, tmp_path):
    model_args, data_args, peft_args, training_args = training_arguments(shapes, pretrained_parts, tmp_path / "out", peft="full")
    peft_args.max_trainable_params = 1000
    with pytest.raises(ValueError, match="max_trainable_params"):
        run_training(model_args, data_args, peft_args, training_args)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_images_are_all_listed_before_training(shapes, pretrained_parts, tmp_path):
    import shutil

    images = tmp_path / "train"
    shutil.copytree(shapes.train_images, images)
    removed = sorted(images.iterdir())[:2]
    for path in removed:
        path.unlink()
    model_args, data_args, peft_args, training_args = training_arguments(shapes, pretrained_parts, tmp_path / "out")
    data_args.train_images = str(images)
    with pytest.raises(ValueError) as error:
        run_training(model_args, data_args, peft_args, training_args)
    assert all(path.name in str(error.value) for path in removed)


def test_evaluation_every_epoch_keeps_the_best_checkpoint_by_cider(shapes, pretrained_parts, tmp_path):
    from modeling_vitgpt2.evaluation.clip_score import clip_score

    output_dir = tmp_path / "epochs"
    args = training_arguments(
        shapes, pretrained_parts, output_dir, peft="cross_attention", max_steps=-1, num_train_epochs=2,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
    )
    args[1].clip_model = str(save_tiny_clip(tmp_path / "clip"))
    metrics = run_training(*args)

    predictions = json.loads((output_dir / "eval_predictions.json").read_text())
    images = {path.stem: path for path in shapes.val_images.iterdir()}
    expected = clip_score(images, predictions, clip=args[1].clip_model, progress=False).score
    assert metrics["eval_clip_score"] == pytest.approx(expected, abs=1e-5)
    last = max(output_dir.glob("checkpoint-*"), key=lambda folder: int(folder.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_cider" in entry]
    assert len(evaluations) == 2 and all(entry["eval_images"] == 4 for entry in evaluations)
    assert state["best_metric"] == max(entry["eval_cider"] for entry in evaluations)
    assert all((folder / "checkpoint_complete.json").is_file() for folder in output_dir.glob("checkpoint-*"))


def test_hf_imagefolder_layout_trains(shapes, pretrained_parts, tmp_path):
    import shutil

    folder = tmp_path / "imagefolder"
    for split, source, annotations in (("train", shapes.train_images, shapes.train_json),
                                       ("validation", shapes.val_images, shapes.val_json)):
        (folder / split).mkdir(parents=True)
        content = json.loads(annotations.read_text())
        names = {image["id"]: image["file_name"] for image in content["images"]}
        captions = {}
        for annotation in content["annotations"]:
            captions.setdefault(names[annotation["image_id"]], []).append(annotation["caption"])
        with open(folder / split / "metadata.jsonl", "w") as metadata:
            for name, texts in captions.items():
                shutil.copy(source / name, folder / split / name)
                metadata.write(json.dumps({"file_name": name, "captions": texts}) + "\n")
    model_args, data_args, peft_args, training_args = training_arguments(shapes, pretrained_parts, tmp_path / "out", max_steps=2)
    data_args.train_json = data_args.train_images = data_args.val_json = data_args.val_images = None
    data_args.dataset_name, data_args.caption_column = str(folder), "captions"
    metrics = run_training(model_args, data_args, peft_args, training_args)
    assert metrics["eval_images"] == 4


def test_training_from_cached_encoder_features_matches_training_from_images(shapes, pretrained_parts, tmp_path):
    def losses(output_dir):
        state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    plain_dir, cached_dir = tmp_path / "images", tmp_path / "cached"
    run_training(*training_arguments(shapes, pretrained_parts, plain_dir, max_steps=4, save_strategy="steps", save_steps=4))
    model_args, data_args, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, cached_dir, max_steps=4, save_strategy="steps", save_steps=4
    )
    data_args.cache_encoder_features, data_args.feature_cache_dir = True, str(tmp_path / "feature-cache")
    run_training(model_args, data_args, peft_args, training_args)

    assert len(list((tmp_path / "feature-cache").glob("*/features.f16"))) == 1
    assert not list((tmp_path / "feature-cache").glob("paged-out-encoder-*"))  # the idle encoder left no file
    # The cache stores float16 features (unit roundoff 4.9e-4); the losses agree to that relative precision.
    assert losses(cached_dir) == pytest.approx(losses(plain_dir), rel=5e-4)


def test_cached_training_pages_the_idle_encoder_out_and_saves_it_intact(
    shapes, pretrained_parts, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from modeling_vitgpt2.data import feature_cache

    paged_out = []
    page_out_encoder = feature_cache.page_out_encoder
    monkeypatch.setattr(
        feature_cache, "page_out_encoder", lambda model, folder: paged_out.append(page_out_encoder(model, folder))
    )
    model_args, data_args, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, tmp_path / "run", peft="full", max_steps=2
    )
    data_args.cache_encoder_features, data_args.feature_cache_dir = True, str(tmp_path / "feature-cache")
    run_training(model_args, data_args, peft_args, training_args)

    assert len(paged_out) == 1
    saved = load_for_inference(tmp_path / "run").encoder.model.state_dict()
    for name, tensor in load_file(pretrained_parts[0]).items():  # the full model was saved from the mapped weights
        assert torch.equal(saved[name], tensor), name


def test_a_full_disk_while_checkpointing_names_the_disk_and_counts_no_checkpoint(shapes, pretrained_parts, tmp_path,
                                                                                 monkeypatch):
    # torch.save reported it as "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...".
    from collections import namedtuple

    from modeling_vitgpt2.training.checkpoints import last_complete_checkpoint
    from modeling_vitgpt2.utils import io
    from modeling_vitgpt2.utils.errors import UserError

    real_save = torch.save

    def short_write(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            real_save(obj, path, *args, **kwargs)
            with open(path, "r+b") as file:  # as far as the disk had room
                file.truncate(100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", short_write)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 4096, 4096))
    output_dir = tmp_path / "run"
    with pytest.raises(io.DiskFullError) as raised:
        run_training(*training_arguments(shapes, pretrained_parts, output_dir, save_strategy="steps", save_steps=4))
    message = str(raised.value)
    assert message.startswith(f"no space left on {raised.value.mount} writing {output_dir}/checkpoint-4, about ")
    assert "bytes needed (4,096 bytes free): free some space there" in message
    assert raised.value.needed_bytes > 0 and isinstance(raised.value, UserError)
    assert last_complete_checkpoint(output_dir) is None  # the cut-short checkpoint does not count


def test_rotating_checkpoints_removes_a_linked_checkpoint_s_link_and_keeps_what_it_points_to(tmp_path):
    """A checkpoint moved to another disk and linked back: rotation deletes the link, never the folder behind it
    (which a plain `rmtree` would refuse silently, and unlinking its manifest would damage)."""
    from modeling_vitgpt2.training.checkpoints import (
        CHECKPOINT_COMPLETE,
        checkpoint_problem,
        rotate_complete_checkpoints,
        write_checkpoint_manifest,
    )

    output_dir, elsewhere = tmp_path / "run", tmp_path / "other disk"
    output_dir.mkdir()
    for step, parent in [(2, elsewhere), (4, output_dir), (6, output_dir)]:
        folder = parent / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes(step))
        write_checkpoint_manifest(folder, step, train_loss_sum=1.0)
    (output_dir / "checkpoint-2").symlink_to(elsewhere / "checkpoint-2", target_is_directory=True)

    rotate_complete_checkpoints(output_dir, newest_step=6, limit=1, best=None)

    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-6"]
    assert (elsewhere / "checkpoint-2" / CHECKPOINT_COMPLETE).is_file()
    assert checkpoint_problem(elsewhere / "checkpoint-2") is None


def _base_model_files(output_dir):
    return {path.name: path.read_bytes() for path in (output_dir / "base_model").iterdir()}


def test_a_refused_start_or_resume_leaves_the_finished_run_s_base_model_as_it_was(shapes, pretrained_parts, tmp_path):
    """The adapter of a finished run captions only with the base model it was trained on (base_model/): a start
    refused by --max_trainable_params, or a resume with other peft settings than its checkpoint's, must not rewrite
    it; the resume is refused in one line naming the checkpoint and both settings."""
    output_dir = tmp_path / "run"
    run_training(*training_arguments(shapes, pretrained_parts, output_dir, max_steps=2, save_strategy="steps",
                                     save_steps=2))
    finished = _base_model_files(output_dir)
    before = captions_of(load_for_inference(output_dir), ViTGPT2Processor.from_pretrained(output_dir), shapes)

    model_args, data_args, peft_args, training_args = training_arguments(shapes, pretrained_parts, output_dir,
                                                                         peft="prefix")
    peft_args.max_trainable_params = 10
    with pytest.raises(ValueError, match="max_trainable_params"):
        run_training(model_args, data_args, peft_args, training_args)
    assert _base_model_files(output_dir) == finished

    for peft, rank, expected in [
        ("adapter", 4, r"checkpoint-2 was trained with --peft lora .*this run has --peft adapter --adapter_bottleneck 8"),
        ("lora", 8, r"checkpoint-2 was trained with --lora_rank 4; this run has --lora_rank 8"),
    ]:
        model_args, data_args, peft_args, training_args = training_arguments(
            shapes, pretrained_parts, output_dir, peft=peft, resume_from_checkpoint="true")
        peft_args.lora_rank = rank
        with pytest.raises(ValueError, match=expected) as refused:
            run_training(model_args, data_args, peft_args, training_args)
        assert "start afresh without --resume_from_checkpoint" in str(refused.value)
        assert _base_model_files(output_dir) == finished
    after = captions_of(load_for_inference(output_dir), ViTGPT2Processor.from_pretrained(output_dir), shapes)
    assert after == before


def test_a_resume_with_another_global_batch_is_refused_unless_the_data_skip_is_ignored(shapes, pretrained_parts,
                                                                                      tmp_path):
    """Trainer skips the trained batches counted in this run's batch size: with another one (other processes, or
    another --per_device_train_batch_size) it would train samples again or leave some out, without a word."""
    from modeling_vitgpt2.training.checkpoints import CHECKPOINT_COMPLETE

    output_dir = tmp_path / "run"
    run_training(*training_arguments(shapes, pretrained_parts, output_dir, per_device_train_batch_size=4, max_steps=2,
                                     save_strategy="steps", save_steps=1, save_total_limit=5))
    manifest = json.loads((output_dir / "checkpoint-1" / CHECKPOINT_COMPLETE).read_text())
    assert manifest["world_size"] == 1 and manifest["global_batch_size"] == 4

    def resume(**training):
        return training_arguments(shapes, pretrained_parts, output_dir, max_steps=2, save_strategy="steps",
                                  save_steps=1, save_total_limit=5, resume_from_checkpoint=str(output_dir / "checkpoint-1"), **training)

    with pytest.raises(ValueError, match=r"checkpoint-1 was written by 1 process\(es\) with a global batch of 4 "
                                         r"samples; this run has 1 with 2.*--ignore_data_skip true"):
        run_training(*resume(per_device_train_batch_size=2))
    run_training(*resume(per_device_train_batch_size=2, ignore_data_skip=True))

    # A checkpoint written before the manifest recorded them resumes as before.
    for name in ("world_size", "global_batch_size"):
        manifest.pop(name)
    (output_dir / "checkpoint-1" / CHECKPOINT_COMPLETE).write_text(json.dumps(manifest))
    run_training(*resume(per_device_train_batch_size=2))


def test_a_lora_run_on_a_base_named_by_a_relative_path_loads_from_anywhere(shapes, pretrained_parts, tmp_path,
                                                                         monkeypatch):
    """adapter_config.json recorded the base as given ('base'): the run loaded only from the folder it was trained
    in, and a push from elsewhere took it for a Hub id and published an adapter whose base does not exist."""
    from modeling_vitgpt2.training.arguments import ModelArguments

    monkeypatch.chdir(tmp_path)
    run_training(*training_arguments(shapes, pretrained_parts, tmp_path / "base", peft="full", max_steps=1))
    _, data_args, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, tmp_path / "lora", peft="lora", max_steps=1)
    run_training(ModelArguments(model_name_or_path="base"), data_args, peft_args, training_args)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    captioner = load_for_inference(tmp_path / "lora")
    assert captioner.peft_config["default"].base_model_name_or_path == config["base_model_name_or_path"]


def _other_encoder_weights(pretrained_parts, folder):
    """A timm weights file with the same architecture as the fixture's but other values: the same config, so only
    the weights tell the bases apart."""
    import timm
    from safetensors.torch import save_file

    from conftest import ENCODER_KWARGS

    torch.manual_seed(1)
    vit = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=0, **ENCODER_KWARGS)
    folder.mkdir()
    save_file(vit.state_dict(), folder / "vit.safetensors")
    return folder / "vit.safetensors"


def test_a_resume_on_other_pretrained_weights_of_the_same_config_is_refused_naming_the_flag(shapes, pretrained_parts,
                                                                                           tmp_path):
    """The base is built again on resume: other --encoder weights with the same config passed every check, and the
    adapter went on training on another encoder than its base_model/ holds. Another --seed changes nothing here
    (the only weights it draws, the cross-attention's, are trained and restored from the checkpoint): accepted."""
    output_dir = tmp_path / "run"
    model_args, data_args, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, output_dir, max_steps=1, save_strategy="steps", save_steps=1)
    data_args.max_eval_images = 1  # evaluating is not what this checks
    run_training(model_args, data_args, peft_args, training_args)
    finished = _base_model_files(output_dir)
    encoder = str(pretrained_parts[0])
    other = str(_other_encoder_weights(pretrained_parts, tmp_path / "other"))

    model_args, data_args, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, output_dir, max_steps=1, resume_from_checkpoint="true")
    model_args.encoder = other
    with pytest.raises(ValueError) as refused:
        run_training(model_args, data_args, peft_args, training_args)
    assert str(refused.value) == (
        f"{output_dir}/checkpoint-1 was trained on another base model than this run builds (--encoder was {encoder}, "
        f"is now {other}), and its adapter would go on training on other weights. Resume with --encoder {encoder}, "
        "or start afresh without --resume_from_checkpoint")
    assert _base_model_files(output_dir) == finished

    model_args, data_args, peft_args, training_args = training_arguments(
        shapes, pretrained_parts, output_dir, max_steps=1, seed=3, resume_from_checkpoint="true")
    data_args.max_eval_images = 1  # evaluating is not what this checks
    run_training(model_args, data_args, peft_args, training_args)


def test_a_from_scratch_adapter_resumes_only_on_the_base_its_seed_drew(shapes, pretrained_parts, tmp_path):
    """From scratch, --seed draws every weight of the base under the adapter: resumed with another one, the adapter
    trained on for the rest of the run on a base that base_model/ does not hold. With the same seed the base is
    drawn again bit for bit, and the resume goes on."""
    from modeling_vitgpt2.training.arguments import ModelArguments

    tiny = {"encoder_kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
            "encoder_hidden_size": 32, "n_embd": 32, "n_layer": 1, "n_head": 2}
    from_scratch = ModelArguments(model_config=json.dumps(tiny), tokenizer_name_or_path=str(pretrained_parts[1]))
    output_dir = tmp_path / "run"

    def run(**training):
        _, data_args, peft_args, training_args = training_arguments(
            shapes, pretrained_parts, output_dir, max_steps=1, save_strategy="steps", save_steps=1, **training)
        data_args.max_eval_images = 1  # evaluating is not what this checks
        return run_training(from_scratch, data_args, peft_args, training_args)

    run()
    with pytest.raises(ValueError, match=r"checkpoint-1 was trained on another base model than this run builds "
                                         r"\(--seed was 0, is now 1\).* Resume with --seed 0, or start afresh"):
        run(seed=1, resume_from_checkpoint="true")
    run(resume_from_checkpoint="true")


def test_the_base_record_names_what_changed_and_older_manifests_say_nothing(tmp_path):
    from modeling_vitgpt2.training.checkpoints import base_change, write_checkpoint_manifest

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    sources = {"--model_name_or_path": "base", "--encoder": None, "--decoder": None, "--seed": 0}
    write_checkpoint_manifest(folder, 2, train_loss_sum=1.0, base_model={"sha256": "a", "sources": sources})
    assert base_change(folder, {"sha256": "a", "sources": {**sources, "--seed": 5}}) is None
    assert base_change(folder, {"sha256": "b", "sources": sources}) == (
        f"{folder} was trained on other base-model weights than this run builds from the same --model_name_or_path "
        "base --seed 0: the files they name have changed since (or another torch or timm version initialises the "
        "new weights otherwise). Restore those files, or start afresh without --resume_from_checkpoint")
    moved = {**sources, "--model_name_or_path": None, "--encoder": "vit", "--decoder": "gpt2"}
    assert "Resume with --model_name_or_path base without --encoder without --decoder, or" in base_change(
        folder, {"sha256": "b", "sources": moved})
    write_checkpoint_manifest(folder, 2, train_loss_sum=1.0)
    assert base_change(folder, {"sha256": "b", "sources": sources}) is None


def test_the_base_digest_covers_the_weights_an_adapter_checkpoint_does_not_hold(tiny_model):
    from modeling_vitgpt2.training.checkpoints import base_weights_digest
    from modeling_vitgpt2.training.peft_methods import PeftArguments, apply_peft

    model = apply_peft(tiny_model, "lora", PeftArguments(peft="lora"))
    digest = base_weights_digest(model)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        # The trained copies (LoRA, the cross-attention's copy) and the originals they replace are the checkpoint's.
        for name, parameter in parameters.items():
            if "lora_" in name or "crossattention" in name:
                parameter.add_(1.0)
        assert base_weights_digest(model) == digest
        parameters["base_model.model.decoder.h.0.attn.c_attn.base_layer.weight"][0, 0] += 1e-6
        assert base_weights_digest(model) != digest


@pytest.mark.parametrize("targets, adapted", [
    (["c_attn", "wte"], "adapts decoder.wte, which shares its weight with lm_head"),
    (["lm_head"], "adapts lm_head, which shares its weight with decoder.wte"),
])
def test_lora_on_the_tied_embedding_or_lm_head_is_refused_before_training(tiny_model, targets, adapted):
    """GPT-2's LM head is its token embedding's weight. LoRA on one of them changes that one only; merged (--merge,
    int8 loading) it changes the shared weight, so the other changes too and the merged model captions otherwise."""
    import copy

    from peft import LoraConfig, get_peft_model

    from modeling_vitgpt2.training.peft_methods import PeftArguments, apply_peft

    with pytest.raises(ValueError) as refused:
        apply_peft(copy.deepcopy(tiny_model), "lora", PeftArguments(peft="lora", lora_target_modules=targets))
    message = str(refused.value)
    assert message.startswith(f"--lora_target_modules {' '.join(targets)} {adapted} (GPT-2 ties")
    assert message.endswith("leave wte and lm_head out of --lora_target_modules (c_attn c_proj c_fc adapt the "
                            "decoder's blocks), or train them with --peft full")
    apply_peft(copy.deepcopy(tiny_model), "lora", PeftArguments(peft="lora", lora_target_modules=["c_attn", "c_fc"]))

    # Why: peft 0.21 merges into the shared weight. When this stops failing, peft keeps the pair apart and the
    # refusal can go.
    lora = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    inputs = {"pixel_values": torch.randn(1, 3, 28, 28), "decoder_input_ids": torch.tensor([[1, 2, 3]])}
    with torch.no_grad():
        unmerged = lora(**inputs).logits
        merged = lora.merge_and_unload()(**inputs).logits
    assert not torch.allclose(merged, unmerged, atol=1e-3)


def test_a_full_fine_tuning_run_resumes_with_unchanged_flags(shapes, pretrained_parts, tmp_path):
    """The default job (`--peft full`) must resume: its checkpoint's config is the one Trainer left on the model
    (with `use_cache` turned off), not the one a resume builds, and only real differences may refuse it."""
    output_dir = tmp_path / "run"
    run_training(*training_arguments(shapes, pretrained_parts, output_dir, peft="full", max_steps=1,
                                     save_strategy="steps", save_steps=1))
    run_training(*training_arguments(shapes, pretrained_parts, output_dir, peft="full", max_steps=2,
                                     save_strategy="steps", save_steps=1, resume_from_checkpoint="true"))
    assert json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
