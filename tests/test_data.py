"""Caption data loading: the COCO layout and its validation, `datasets` image folders, and the batch collator."""

import csv
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from modeling_vitgpt2 import ViTGPT2Processor
from modeling_vitgpt2.data.captions import (
    CaptionCollator,
    CaptionDataError,
    load_coco_captions,
    load_hf_captions,
    references_per_image,
)
from modeling_vitgpt2.data.synthetic import draw_scene, random_scene, write_synthetic_coco
from modeling_vitgpt2.training.tokenizer import train_caption_tokenizer

NUM_TRAIN, NUM_VAL, CAPTIONS_PER_IMAGE = 8, 5, 4


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=3)


@pytest.fixture()
def coco_copy(synthetic, tmp_path):
    """A private, editable copy of the synthetic validation split: (annotations json, image dir, parsed content)."""
    image_dir = tmp_path / "val"
    shutil.copytree(synthetic.val_images, image_dir)
    annotations = tmp_path / "val.json"
    shutil.copy(synthetic.val_json, annotations)
    return annotations, image_dir, json.loads(annotations.read_text())


@pytest.fixture(scope="module")
def processor(synthetic):
    """The real processor with a 16-pixel identity-normalised transform, so tests can read pixel values back."""
    captions = [a["caption"] for a in json.loads(synthetic.train_json.read_text())["annotations"]]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=[0.0] * 3, image_std=[1.0] * 3
    )
    return ViTGPT2Processor(image_processor=image_processor, tokenizer=train_caption_tokenizer(captions * 10))


def _rewrite(path: Path, content) -> None:
    path.write_text(json.dumps(content))


# ----------------------------------------------------------------------------------------------------------------
# COCO layout


def test_coco_loader_reads_the_synthetic_set(synthetic):
    rows = load_coco_captions(synthetic.train_json, synthetic.train_images)
    content = json.loads(synthetic.train_json.read_text())

    assert len(rows) == NUM_TRAIN * CAPTIONS_PER_IMAGE
    assert {"image_path", "image_name", "image_id", "caption", "annotation_id"} <= set(rows.column_names)
    assert rows["caption"] == [a["caption"] for a in content["annotations"]]
    assert rows[0]["image_name"] == "train_000000" and Path(rows[0]["image_path"]).is_file()

    per_image = references_per_image(rows)
    assert len(per_image) == NUM_TRAIN
    assert per_image["image_name"] == [Path(i["file_name"]).stem for i in content["images"]]
    assert all(len(set(references)) == CAPTIONS_PER_IMAGE for references in per_image["references"])
    assert "caption" not in per_image.column_names


def test_malformed_json_is_named_with_line_and_column(coco_copy):
    annotations, image_dir, _ = coco_copy
    annotations.write_text('{\n  "images": [\n    {"file_name": "a.png", "id": 1}\n    {"file_name": "b.png"}\n]}')
    with pytest.raises(CaptionDataError, match=r"val\.json is not valid JSON: .* line 4, column 5"):
        load_coco_captions(annotations, image_dir)


@pytest.mark.parametrize(
    "section, index, field",
    [("images", 1, "file_name"), ("images", 2, "id"), ("annotations", 5, "image_id"),
     ("annotations", 0, "caption"), ("annotations", 7, "id")],
)
def test_a_missing_field_is_named_with_its_file_and_index(coco_copy, section, index, field):
    annotations, image_dir, content = coco_copy
    del content[section][index][field]
    _rewrite(annotations, content)
    with pytest.raises(CaptionDataError, match=rf"val\.json: {section}\[{index}\] has no field '{field}'"):
        load_coco_captions(annotations, image_dir)


@pytest.mark.parametrize("section, index, field, value",
                         [("images", 2, "id", [1]), ("annotations", 5, "image_id", {"id": 1}),
                          ("annotations", 7, "id", True)])
def test_an_id_that_is_no_number_or_string_is_named(coco_copy, section, index, field, value):
    annotations, image_dir, content = coco_copy
    content[section][index][field] = value
    _rewrite(annotations, content)
    with pytest.raises(CaptionDataError, match=rf"val\.json: {section}\[{index}\]\.{field} must be a number or a string"):
        load_coco_captions(annotations, image_dir)


@pytest.mark.parametrize("section", ["images", "annotations"])
def test_a_missing_top_level_list_is_named(coco_copy, section):
    annotations, image_dir, content = coco_copy
    del content[section]
    _rewrite(annotations, content)
    with pytest.raises(CaptionDataError, match=rf"val\.json has no top-level field '{section}'"):
        load_coco_captions(annotations, image_dir)


def test_an_annotation_of_an_unknown_image_is_named_by_its_id(coco_copy):
    annotations, image_dir, content = coco_copy
    content["annotations"][2]["image_id"] = 999
    _rewrite(annotations, content)
    annotation_id = content["annotations"][2]["id"]
    with pytest.raises(CaptionDataError, match=rf"annotation id {annotation_id} refers to image_id 999"):
        load_coco_captions(annotations, image_dir)


@pytest.mark.parametrize("caption", ["", "   \n"])
def test_an_empty_caption_is_named_by_its_annotation_id(coco_copy, caption):
    annotations, image_dir, content = coco_copy
    content["annotations"][6]["caption"] = caption
    _rewrite(annotations, content)
    annotation_id = content["annotations"][6]["id"]
    with pytest.raises(CaptionDataError, match=rf"annotation id {annotation_id} has an empty caption"):
        load_coco_captions(annotations, image_dir)


def test_all_missing_images_are_listed_in_one_error(coco_copy):
    annotations, image_dir, content = coco_copy
    gone = [image["file_name"] for image in content["images"][:2]]
    for name in gone:
        (image_dir / name).unlink()
    with pytest.raises(CaptionDataError, match=r"2 image file\(s\) named in .* are missing") as raised:
        load_coco_captions(annotations, image_dir)
    assert all(name in str(raised.value) for name in gone)
    assert content["images"][2]["file_name"] not in str(raised.value)


def test_a_wrong_image_dir_is_pointed_out(coco_copy, tmp_path):
    annotations, _, _ = coco_copy
    with pytest.raises(CaptionDataError, match=rf"none of the {NUM_VAL} images .* Is image_dir the folder"):
        load_coco_captions(annotations, tmp_path / "nowhere")


def _break_images(image_dir: Path, content) -> list[str]:
    """Truncates the first image and replaces the second with text; returns their file names."""
    truncated, not_an_image = (image["file_name"] for image in content["images"][:2])
    data = (image_dir / truncated).read_bytes()
    (image_dir / truncated).write_bytes(data[: len(data) // 2])
    (image_dir / not_an_image).write_text("this is not a PNG")
    return [truncated, not_an_image]


def test_corrupt_and_truncated_images_are_named(coco_copy):
    annotations, image_dir, content = coco_copy
    broken = _break_images(image_dir, content)
    with pytest.raises(CaptionDataError, match=r"2 unreadable image\(s\)") as raised:
        load_coco_captions(annotations, image_dir, num_workers=2)
    assert all(name in str(raised.value) for name in broken)
    assert "skip_bad_images=True" in str(raised.value)


def test_skip_bad_images_drops_their_captions_and_logs_each_file(coco_copy, caplog):
    annotations, image_dir, content = coco_copy
    broken = _break_images(image_dir, content)
    (image_dir / content["images"][2]["file_name"]).unlink()

    with caplog.at_level(logging.WARNING, logger="modeling_vitgpt2.data.captions"):
        rows = load_coco_captions(annotations, image_dir, skip_bad_images=True)

    kept = {image["id"] for image in content["images"][3:]}
    assert set(rows["image_id"]) == kept and len(rows) == len(kept) * CAPTIONS_PER_IMAGE
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 3
    for name in broken + [content["images"][2]["file_name"]]:
        assert sum(name in warning for warning in warnings) == 1


def test_grayscale_rgba_palette_and_16_bit_images_load_as_rgb(tmp_path, processor):
    pixels = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    images = {
        "gray.png": Image.fromarray((pixels * 255).astype(np.uint8)),
        "alpha.png": Image.new("RGBA", (32, 32), (255, 0, 0, 0)),
        "sixteen.png": Image.fromarray((pixels * 65535).astype(np.uint16)),
        "palette.png": Image.new("RGB", (32, 32), (0, 128, 255)).convert("P"),
    }
    content = {"images": [], "annotations": []}
    for image_id, (name, image) in enumerate(images.items()):
        image.save(tmp_path / name)
        content["images"].append({"file_name": name, "id": image_id})
        content["annotations"].append({"image_id": image_id, "caption": f"a {name[:-4]} picture", "id": image_id})
    _rewrite(tmp_path / "captions.json", content)

    rows = load_coco_captions(tmp_path / "captions.json", tmp_path)
    batch = CaptionCollator(processor)(list(rows))

    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    # Transparent pixels are composited on white and 16-bit values are rescaled, not clipped to white.
    alpha, sixteen = batch["pixel_values"][1], batch["pixel_values"][2]
    assert torch.allclose(alpha, torch.ones_like(alpha))
    assert 0.3 < sixteen.mean() < 0.7


# ----------------------------------------------------------------------------------------------------------------
# `datasets` image folders


def _image_folder(root: Path, metadata: str, captions_of: dict) -> Path:
    """An imagefolder of synthetic scenes whose metadata file gives each image's captions."""
    root.mkdir()
    for name in captions_of:
        draw_scene(random_scene(random.Random(name)), 32).save(root / name)
    if metadata == "jsonl":
        with open(root / "metadata.jsonl", "w") as handle:
            for name, captions in captions_of.items():
                handle.write(json.dumps({"file_name": name, "captions": captions, "source": "test"}) + "\n")
    else:
        with open(root / "metadata.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "captions", "source"])
            writer.writerows([name, captions, "test"] for name, captions in captions_of.items())
    return root


def test_imagefolder_with_lists_of_captions_gives_one_row_per_caption(tmp_path, processor):
    captions_of = {"a.png": ["first of a", "second of a"], "b.png": ["only b"], "c.png": ["c1", "c2", "c3"]}
    folder = _image_folder(tmp_path / "folder", "jsonl", captions_of)

    rows = load_hf_captions("imagefolder", split="train", image_column="image", caption_column="captions",
                            data_dir=str(folder), num_workers=2, cache_dir=str(tmp_path / "cache"))

    assert len(rows) == 6
    assert {"image", "image_name", "image_id", "caption", "annotation_id"} <= set(rows.column_names)
    per_image = references_per_image(rows)
    assert dict(zip(per_image["image_name"], per_image["references"])) == {
        name[:-4]: captions for name, captions in captions_of.items()
    }
    assert isinstance(per_image[0]["image"], Image.Image)

    batch = CaptionCollator(processor)(list(rows.select(range(3))))
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape


def test_imagefolder_path_with_csv_string_captions(tmp_path):
    folder = _image_folder(tmp_path / "folder", "csv", {"x.png": "a picture of x", "y.png": "a picture of y"})
    rows = load_hf_captions(str(folder), split="train", caption_column="captions", cache_dir=str(tmp_path / "cache"))
    assert sorted(zip(rows["image_name"], rows["caption"])) == [("x", "a picture of x"), ("y", "a picture of y")]


def test_a_wrong_column_name_lists_the_available_columns(tmp_path):
    folder = _image_folder(tmp_path / "folder", "jsonl", {"a.png": ["a"]})
    available = r"its columns are \['image', 'captions', 'source'\]"
    with pytest.raises(CaptionDataError, match=rf"no column 'caption'; {available}"):
        load_hf_captions(str(folder), split="train", caption_column="caption", cache_dir=str(tmp_path / "cache"))


def test_imagefolder_empty_caption_and_bad_image(tmp_path, caplog):
    folder = _image_folder(tmp_path / "folder", "jsonl", {"a.png": ["fine"], "b.png": ["fine", " "]})
    with pytest.raises(CaptionDataError, match=r"row 1, caption 1 of column 'captions' is empty"):
        load_hf_captions(str(folder), split="train", caption_column="captions", cache_dir=str(tmp_path / "cache"))

    folder = _image_folder(tmp_path / "other", "jsonl", {"a.png": ["a one"], "b.png": ["b one", "b two"]})
    (folder / "b.png").write_bytes((folder / "b.png").read_bytes()[:60])
    with pytest.raises(CaptionDataError, match=r"(?s)1 unreadable image\(s\).*b\.png"):
        load_hf_captions(str(folder), split="train", caption_column="captions", cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="modeling_vitgpt2.data.captions"):
        rows = load_hf_captions(str(folder), split="train", caption_column="captions", skip_bad_images=True,
                                cache_dir=str(tmp_path / "cache"))
    assert rows["caption"] == ["a one"]
    assert any("b.png" in record.getMessage() for record in caplog.records)


# ----------------------------------------------------------------------------------------------------------------
# Collator


def test_collator_batches_paths_and_pil_images_for_teacher_forcing(synthetic, processor):
    rows = list(load_coco_captions(synthetic.val_json, synthetic.val_images).select(range(3)))
    # The middle row holds a PIL image (as `datasets` rows do) instead of a path.
    rows[1]["image"] = Image.open(rows[1].pop("image_path"))
    tokenizer = processor.tokenizer

    batch = CaptionCollator(processor)(rows)

    assert set(batch) == {"pixel_values", "decoder_input_ids", "decoder_attention_mask", "labels"}
    assert all(isinstance(value, torch.Tensor) for value in batch.values())
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    for row, inputs, mask, labels in zip(rows, batch["decoder_input_ids"], batch["decoder_attention_mask"],
                                         batch["labels"]):
        tokens = tokenizer(row["caption"], add_special_tokens=False)["input_ids"]
        length = len(tokens) + 1
        assert inputs[:length].tolist() == [tokenizer.bos_token_id] + tokens
        assert labels[:length].tolist() == tokens + [tokenizer.eos_token_id]
        assert mask.tolist() == [1] * length + [0] * (len(mask) - length)
        assert (labels[length:] == -100).all()


def test_collator_truncates_to_max_length_and_serves_generation_rows(synthetic, processor):
    rows = list(load_coco_captions(synthetic.val_json, synthetic.val_images).select(range(2)))
    batch = CaptionCollator(processor, max_length=5)(rows)
    assert batch["decoder_input_ids"].shape == (2, 5)
    assert (batch["labels"][:, -1] == processor.tokenizer.eos_token_id).all()

    evaluation = references_per_image(load_coco_captions(synthetic.val_json, synthetic.val_images))
    assert set(CaptionCollator(processor)(list(evaluation))) == {"pixel_values"}


def test_collator_explains_a_row_without_image(processor):
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        CaptionCollator(processor)([{"caption": "a red circle"}])
