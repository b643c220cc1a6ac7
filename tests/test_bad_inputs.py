"""Hostile and mistaken inputs: each fails with a message naming the file or field, through the same code paths as
`train.py` and `eval.py` (exit status 2, one line, no traceback), and leaves no output behind. The bad-input
table in docs/reliability.md lists these cases with the messages users see."""

import json
import os
import re
import shutil
import stat

import pytest
import torch
from PIL import Image

from helpers import huge_png, load_cli_module
from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration, ViTGPT2Processor
from modeling_vitgpt2.data.captions import CaptionDataError, load_coco_captions, references_per_image
from modeling_vitgpt2.evaluation.jobs import read_coco_references
from modeling_vitgpt2.utils.io import write_json_atomic, write_text_atomic


def coco(folder, file_names, encoding="utf-8"):
    """A COCO captions file naming `file_names` (two captions each) and those images, written in `folder`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    content = {"images": [], "annotations": []}
    for index, name in enumerate(file_names):
        content["images"].append({"file_name": name, "id": index})
        for offset in range(2):
            content["annotations"].append({"image_id": index, "id": 2 * index + offset, "caption": f"shape {offset}"})
        target = folder / "images" / name
        if not name.startswith("/") and ".." not in name:
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(target.with_suffix(".png"), format="PNG")
            if target.suffix != ".png":
                target.with_suffix(".png").rename(target)
    path = folder / "captions.json"
    path.write_text(json.dumps(content), encoding=encoding)
    return path, folder / "images"


def run_eval(argv, capsys):
    """eval.py's exit status and its error line (progress bars may come before it on stderr)."""
    status = load_cli_module().main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert status == 0 or lines[-1].startswith(f"eval.py {argv[0]}: error: "), err
    return status, lines[-1] if lines else ""


# ----------------------------------------------------------------------------------------------------------------
# Captions files: one parser for training and scoring


def test_images_sharing_a_name_are_refused_by_training_and_scoring_alike(tmp_path):
    path, images = coco(tmp_path, ["v0.jpg", "v0.png", "v1.png"])
    message = r"'v0.jpg' and 'v0.png' share the name 'v0'.*merged"
    with pytest.raises(CaptionDataError, match=message):
        load_coco_captions(path, images)  # what train.py's evaluation set is built from
    with pytest.raises(CaptionDataError, match=message):
        read_coco_references(path)  # what eval.py score reads


def test_a_byte_order_mark_is_read_by_training_and_scoring_alike(tmp_path):
    path, images = coco(tmp_path, ["a.png", "b.png"], encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    rows = load_coco_captions(path, images)
    assert references_per_image(rows)["image_name"] == ["a", "b"]
    assert list(read_coco_references(path).references) == ["a", "b"]


@pytest.mark.parametrize("file_name", ["../outside.png", "/etc/outside.png", "sub/../../outside.png"])
def test_a_file_name_leaving_the_image_folder_is_refused(tmp_path, file_name):
    path, images = coco(tmp_path, ["a.png", file_name])
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    with pytest.raises(CaptionDataError, match=r"images\[1\]\.file_name .* leaves the image folder"):
        load_coco_captions(path, images)
    with pytest.raises(CaptionDataError, match="leaves the image folder"):
        read_coco_references(path)  # eval.py score refuses it too


def test_a_symbolic_link_out_of_the_image_folder_is_refused(tmp_path):
    path, images = coco(tmp_path, ["a.png", "b.png"])
    secret = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(secret)
    (images / "b.png").unlink()
    (images / "b.png").symlink_to(secret)
    with pytest.raises(CaptionDataError, match=r"captions\.json: image 'b.png' resolves to .*elsewhere.png, outside"):
        load_coco_captions(path, images)


# ----------------------------------------------------------------------------------------------------------------
# Output files


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        json_file = write_json_atomic(tmp_path / "scores.json", {"cider": 1.0})
        text_file = write_text_atomic(tmp_path / "predictions.csv", "a.png,1\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(json_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(text_file.stat().st_mode) == 0o644
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_a_full_disk_during_an_atomic_write_names_the_disk_and_file(tmp_path, monkeypatch):
    import errno

    from modeling_vitgpt2.utils import io
    from modeling_vitgpt2.utils.errors import UserError

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(io.DiskFullError, match=r"^no space left on /\S* writing .*scores\.json \([\d,]+ bytes free\): "
                       r"free some space there") as raised:
        write_json_atomic(tmp_path / "scores.json", {"cider": 1.0})
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, (UserError, OSError))
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary


def test_torchs_short_write_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    # torch.save reports a full disk as an internal assertion, with no errno.
    from collections import namedtuple

    from modeling_vitgpt2.utils import io

    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(io.DiskFullError, match=r"writing .*checkpoint-6, about 5,000,000 bytes needed \(1,000 bytes"):
        with io.naming_a_full_disk(tmp_path / "checkpoint-6", needed_bytes=5_000_000):
            raise short_write
    monkeypatch.setattr(io.shutil, "disk_usage", lambda folder: usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room enough: some other fault, left as it is
        with io.naming_a_full_disk(tmp_path / "checkpoint-6", needed_bytes=5_000_000):
            raise short_write


def test_an_output_under_a_file_fails_before_any_captioning(captioner_dir, data, tmp_path, capsys, monkeypatch):
    from modeling_vitgpt2.evaluation import jobs as evaluation

    monkeypatch.setattr(evaluation, "caption_images", lambda *a, **k: pytest.fail("captioned before checking"))
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder was meant")
    status, err = run_eval(["caption", "--model", captioner_dir, "--images", data / "photos",
                            "--output", blocker / "preds.json"], capsys)
    assert status == 2
    assert f"cannot write {blocker / 'preds.json'}: {blocker} is a file" in err


# ----------------------------------------------------------------------------------------------------------------
# Images and models given to eval.py


def test_an_image_past_the_pixel_limit_is_named_by_eval_caption_and_attention(captioner_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    huge_png(images / "bomb.png")  # 144 Mpx in a small file: Pillow alone would decode it
    for command in (["caption", "--images", images, "--output", tmp_path / "out" / "p.json"],
                    ["attention", "--images", images / "bomb.png", "--output_dir", tmp_path / "out"]):
        status, err = run_eval([command[0], "--model", captioner_dir, *command[1:]], capsys)
        assert status == 2
        assert ("bomb.png: it is 12,000 x 12,000 = 144,000,000 pixels, more than the limit of 89,478,485 (a guard "
                "against decompression bombs). Shrink it, or raise the limit with the environment variable "
                "VITGPT2_MAX_IMAGE_PIXELS=144000000") in err
    assert not (tmp_path / "out").exists()


def test_the_pixel_limit_is_set_for_eval_by_environment(captioner_dir, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (200, 200)).save(images / "big.png")
    monkeypatch.setenv("VITGPT2_MAX_IMAGE_PIXELS", "10000")
    status, err = run_eval(["caption", "--model", captioner_dir, "--images", images, "--output", tmp_path / "p.json"],
                           capsys)
    assert status == 2 and "big.png: it is 200 x 200 = 40,000 pixels, more than the limit of 10,000" in err
    monkeypatch.setenv("VITGPT2_MAX_IMAGE_PIXELS", "40000")
    assert run_eval(["caption", "--model", captioner_dir, "--images", images, "--output", tmp_path / "p.json"],
                    capsys)[0] == 0


def _break_model(folder, how):
    if how == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return r"model\.safetensors is truncated"
    if how == "no tokenizer":
        (folder / "tokenizer.json").unlink()
        return r"has no tokenizer \(tokenizer\.json\): save the processor"
    if how == "pickle named safetensors":
        torch.save({"weight": torch.zeros(2)}, folder / "model.safetensors")
        return r"model\.safetensors is not a safetensors file"
    if how == "unsafe pickle weights":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95\x0c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94.")
        return r"pytorch_model\.bin: pickled weights that torch refuses to load safely"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated weights", "no tokenizer", "pickle named safetensors",
                                 "unsafe pickle weights"])
def test_a_damaged_model_folder_is_named(captioner_dir, data, tmp_path, capsys, how):
    folder = tmp_path / "model"
    shutil.copytree(captioner_dir, folder)
    message = _break_model(folder, how)
    status, err = run_eval(["caption", "--model", folder, "--images", data / "photos",
                            "--output", tmp_path / "out" / "p.json"], capsys)
    assert status == 2
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights", ["adapter_model.bin", None], ids=["pickled", "none"])
def test_an_adapter_folder_without_safetensors_weights_says_why(captioner_dir, data, tmp_path, capsys, weights):
    # It said "No such file or directory: .../adapter_model.safetensors", as if the adapter were lost.
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(captioner_dir / name, folder / name)
    write_json_atomic(folder / "adapter_config.json",
                      {"peft_type": "LORA", "base_model_name_or_path": str(captioner_dir), "r": 2})
    if weights:
        torch.save({"base_model.model.decoder.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 4)}, folder / weights)
        message = (r"adapter_model\.bin: adapter weights as a pickle, and no adapter_model\.safetensors; this project "
                   r"loads adapter weights only from safetensors, which cannot run code\. If you trust the file, "
                   r"convert it: python -c .*st\.save_file\(torch\.load\(")
    else:
        message = r"has adapter_config\.json but no adapter weights \(adapter_model\.safetensors\): the adapter was"
    status, err = run_eval(["caption", "--model", folder, "--images", data / "photos",
                            "--output", tmp_path / "out" / "p.json"], capsys)
    assert status == 2
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_no_images_is_a_clear_value_error(captioner_dir):
    processor = ViTGPT2Processor.from_pretrained(captioner_dir)
    model = ViTGPT2ForConditionalGeneration.from_pretrained(captioner_dir)
    with pytest.raises(ValueError, match="images is empty: pass at least one image"):
        processor(images=[])
    empty = processor(images=[Image.new("RGB", (8, 8))])["pixel_values"][:0]
    with pytest.raises(ValueError, match=r"pixel_values holds no images \(batch size 0\)"):
        model.generate(pixel_values=empty, num_beams=2, max_length=5)
