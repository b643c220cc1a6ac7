"""The encoder-feature cache: same loss as encoding the images, no encoder calls in training, keys that catch every
change (encoder, transform, image file), atomic builds, float16 memmap on disk, and errors that name the image."""

import copy
import io
import json
import mmap
import os
import pickle
import sys
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor
from transformers.modeling_outputs import BaseModelOutput

from conftest import TINY_CAPTIONS
from modeling_vitgpt2 import ImageLoadError, ViTGPT2Processor, load_image
from modeling_vitgpt2.data.captions import CaptionCollator
from modeling_vitgpt2.data.feature_cache import (
    DATA_FILE,
    INDEX_FILE,
    CachedEncoderOutput,
    CachedFeatureCollator,
    EncoderFeatureCache,
    FeatureCacheMissError,
    image_key,
    page_out_encoder,
    reclaim_pages,
    without_image_decoding,
)

NUM_IMAGES = 3
TOKENS, WIDTH = 5, 48  # the tiny ViT: CLS + 2x2 patches, 48-d


def write_random_png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(36, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def image_paths(tmp_path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    return [write_random_png(folder / f"image_{index}.png", seed=index) for index in range(NUM_IMAGES)]


@pytest.fixture()
def rows(image_paths) -> list[dict]:
    """Caption rows as the COCO loader makes them; the first image has two captions."""
    images = image_paths + image_paths[:1]
    return [
        {"image_path": str(path), "image_name": path.stem, "caption": caption}
        for path, caption in zip(images, TINY_CAPTIONS)
    ]


@pytest.fixture()
def frozen_model(tiny_model):
    tiny_model.encoder.requires_grad_(False)
    return tiny_model


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


class EncoderCalls:
    """Counts the encoder's forward calls and the images they encode."""

    def __init__(self, model):
        self.images = []
        self.handle = model.encoder.register_forward_hook(lambda module, args, output: self.images.append(len(args[0])))

    @property
    def calls(self) -> int:
        return len(self.images)


def reference_features(model, processor, path) -> torch.Tensor:
    """What the encoder makes of one image file, in eval mode and float32."""
    with torch.no_grad():
        pixel_values = processor(images=[load_image(path)])["pixel_values"]
        return model.encoder.eval()(pixel_values).last_hidden_state[0]


def assert_float16_close(cached: torch.Tensor, reference: torch.Tensor) -> None:
    assert cached.dtype == torch.float16 and cached.shape == (TOKENS, WIDTH)
    torch.testing.assert_close(cached.float(), reference, rtol=1e-3, atol=1e-3)  # float16 rounding is 4.9e-4 relative


# ----------------------------------------------------------------------------------------------------------------
# Training from the cache


def test_cached_batch_gives_the_same_loss_as_encoding_the_images(frozen_model, tiny_processor, rows, cache_dir):
    collator = CaptionCollator(tiny_processor, max_length=12)
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows, batch_size=2)
    cached_collator = CachedFeatureCollator(collator, cache)

    batch, cached_batch = collator(rows), cached_collator(rows)
    assert set(cached_batch) == {"encoder_outputs", "decoder_input_ids", "decoder_attention_mask", "labels"}
    for key in ("decoder_input_ids", "decoder_attention_mask", "labels"):
        assert torch.equal(cached_batch[key], batch[key])
    features = cached_batch["encoder_outputs"].last_hidden_state
    assert features.shape == (len(rows), TOKENS, WIDTH) and features.dtype == torch.float16  # the model casts it

    with torch.no_grad():
        loss = frozen_model(**batch).loss
        cached_loss = frozen_model(**cached_batch).loss
    assert abs(loss.item() - cached_loss.item()) < 1e-3


def test_training_from_the_cache_never_calls_the_encoder(frozen_model, tiny_processor, rows, cache_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    train_rows = datasets.Dataset.from_list(rows)  # as load_coco_captions returns them
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(train_rows)
    assert len(cache) == NUM_IMAGES
    counter = EncoderCalls(frozen_model)
    decoder_before = frozen_model.decoder.h[0].crossattention.c_attn.weight.detach().clone()
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        remove_unused_columns=False,  # the collator needs the image and caption columns
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=frozen_model,
        args=arguments,
        train_dataset=train_rows,
        data_collator=CachedFeatureCollator(CaptionCollator(tiny_processor), cache),
    )
    trainer.train()

    assert counter.calls == 0
    assert not torch.equal(frozen_model.decoder.h[0].crossattention.c_attn.weight, decoder_before)  # it did train


def test_collator_survives_pickling_for_dataloader_workers(frozen_model, tiny_processor, rows, cache_dir):
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    collator = CachedFeatureCollator(CaptionCollator(tiny_processor), cache)
    copy = pickle.loads(pickle.dumps(collator))
    assert copy.cache.model is None  # the worker's copy reads only; the model stays in the main process
    torch.testing.assert_close(
        copy(rows)["encoder_outputs"].last_hidden_state, collator(rows)["encoder_outputs"].last_hidden_state
    )


def test_cached_batches_can_be_pinned_by_the_dataloader(frozen_model, tiny_processor, rows, cache_dir, monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    batch = CachedFeatureCollator(CaptionCollator(tiny_processor), cache)(rows)
    # Pinning needs a GPU; stand in for it, so that what is tested is that the batch's structure can be pinned
    # (a plain ModelOutput raises "You cannot use ``update``" here).
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args, **kwargs: tensor.clone())
    pinned = pin_memory(batch)
    assert isinstance(pinned["encoder_outputs"], CachedEncoderOutput)
    assert torch.equal(pinned["encoder_outputs"].last_hidden_state, batch["encoder_outputs"].last_hidden_state)


def test_generation_from_the_cache_captions_every_image(frozen_model, tiny_processor, rows, cache_dir):
    images = [{"image_path": row["image_path"], "image_name": row["image_name"]} for row in rows[:NUM_IMAGES]]
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(images)
    batch = CachedFeatureCollator(CaptionCollator(tiny_processor), cache)(images)
    assert set(batch) == {"encoder_outputs"}  # rows without captions, as references_per_image makes them

    counter = EncoderCalls(frozen_model)
    settings = dict(max_length=6, num_beams=2, do_sample=False)
    with torch.no_grad():
        sequences = frozen_model.generate(**batch, **settings)
        features = batch["encoder_outputs"].last_hidden_state.float()
        expected = frozen_model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=features), **settings)
    assert counter.calls == 0
    assert sequences.shape[0] == NUM_IMAGES and torch.equal(sequences, expected)


# ----------------------------------------------------------------------------------------------------------------
# What is on disk


def test_features_are_one_float16_memmap_row_per_unique_image(
    frozen_model, tiny_processor, rows, image_paths, cache_dir
):
    counter = EncoderCalls(frozen_model)
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows, batch_size=2)

    assert sum(counter.images) == NUM_IMAGES  # the image with two captions is encoded once
    assert len(cache) == NUM_IMAGES
    index = json.loads((cache.folder / INDEX_FILE).read_text())
    assert (index["rows"], index["tokens"], index["width"], index["dtype"]) == (NUM_IMAGES, TOKENS, WIDTH, "float16")
    data_file = cache.folder / DATA_FILE
    assert data_file.stat().st_size == NUM_IMAGES * TOKENS * WIDTH * 2
    on_disk = np.memmap(data_file, dtype=np.float16, mode="r", shape=(NUM_IMAGES, TOKENS, WIDTH))
    for path in image_paths:
        row = index["images"][image_key(path)]
        assert np.array_equal(on_disk[row], cache.features(path).numpy())
        assert_float16_close(cache.features(path), reference_features(frozen_model, tiny_processor, path))


def test_a_second_build_encodes_nothing(frozen_model, tiny_processor, rows, cache_dir):
    EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    counter = EncoderCalls(frozen_model)
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    assert counter.calls == 0 and len(cache) == NUM_IMAGES


# ----------------------------------------------------------------------------------------------------------------
# Any change recomputes


def test_a_changed_encoder_weight_uses_a_different_cache(frozen_model, tiny_processor, rows, image_paths, cache_dir):
    before = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    with torch.no_grad():
        frozen_model.encoder.model.blocks[0].mlp.fc1.weight[0, 0] += 1.0
    after = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor)

    assert after.folder != before.folder and len(after) == 0
    after.build(rows)
    assert not torch.equal(after.features(image_paths[0]), before.features(image_paths[0]))
    reference = reference_features(frozen_model, tiny_processor, image_paths[0])
    assert_float16_close(after.features(image_paths[0]), reference)


def test_a_changed_encoder_layer_norm_epsilon_uses_a_different_cache(frozen_model, tiny_processor, rows, cache_dir):
    """The epsilon changes the features but no weight (a model converted from a transformers ViT sets it)."""
    from modeling_vitgpt2 import ViTGPT2ForConditionalGeneration

    config = copy.deepcopy(frozen_model.config)
    config.encoder_layer_norm_eps = 1e-3
    other = ViTGPT2ForConditionalGeneration(config).eval()
    other.load_state_dict(frozen_model.state_dict())
    with torch.no_grad():
        pixels = torch.randn(1, 3, 28, 28)
        assert not torch.equal(other.get_encoder()(pixels).last_hidden_state,
                               frozen_model.get_encoder()(pixels).last_hidden_state)
    assert (EncoderFeatureCache(cache_dir, other, tiny_processor).folder
            != EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).folder)


def test_a_changed_decoder_weight_keeps_the_cache(frozen_model, tiny_processor, rows, cache_dir):
    before = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    with torch.no_grad():
        frozen_model.decoder.h[0].crossattention.c_attn.weight += 1.0  # what training changes
    assert EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).folder == before.folder


def test_a_changed_transform_uses_a_different_cache(frozen_model, tiny_processor, rows, image_paths, cache_dir):
    before = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    settings = tiny_processor.image_processor.to_dict()
    settings.pop("image_processor_type")
    settings["image_mean"] = [0.4, 0.5, 0.6]
    changed = ViTGPT2Processor(image_processor=CLIPImageProcessor(**settings), tokenizer=tiny_processor.tokenizer)
    after = EncoderFeatureCache(cache_dir, frozen_model, changed)

    assert after.folder != before.folder and len(after) == 0
    after.build(rows)
    assert_float16_close(after.features(image_paths[1]), reference_features(frozen_model, changed, image_paths[1]))


def test_saving_the_processor_keeps_the_cache(frozen_model, tiny_processor, cache_dir, tmp_path):
    # Under torchrun only the main process saves the base model's processor, which adds `auto_map` to its settings.
    processor = copy.deepcopy(tiny_processor)  # the session's processor stays unsaved
    before = EncoderFeatureCache(cache_dir, frozen_model, processor)
    processor.save_pretrained(tmp_path / "saved")
    assert EncoderFeatureCache(cache_dir, frozen_model, processor).folder == before.folder


def test_a_modified_image_file_is_encoded_again(frozen_model, tiny_processor, rows, image_paths, cache_dir):
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    old_features = cache.features(image_paths[0])
    untouched = cache.features(image_paths[2])
    previous = image_paths[0].stat()
    write_random_png(image_paths[0], seed=99)
    # Some file systems keep coarse modification times: make sure this one reads as changed.
    os.utime(image_paths[0], ns=(previous.st_atime_ns, previous.st_mtime_ns + 10**9))

    with pytest.raises(FeatureCacheMissError, match="image_0.png"):
        cache.features(image_paths[0])  # stale features are never served
    counter = EncoderCalls(frozen_model)
    cache.build(rows)

    assert counter.images == [1]  # only the modified image
    new_features = cache.features(image_paths[0])
    assert not torch.equal(new_features, old_features)
    assert_float16_close(new_features, reference_features(frozen_model, tiny_processor, image_paths[0]))
    assert torch.equal(cache.features(image_paths[2]), untouched)


def test_an_image_replaced_with_its_size_and_mtime_kept_is_encoded_again(
    frozen_model, tiny_processor, rows, image_paths, cache_dir, tmp_path
):
    """`cp -p`, `rsync -a` and `tar` keep the modification time: a key by size and mtime would serve stale features."""
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    old_features = cache.features(image_paths[0])
    replacement = write_random_png(tmp_path / "other.png", seed=99)
    assert replacement.stat().st_size == image_paths[0].stat().st_size  # same-size PNGs of random pixels
    previous = image_paths[0].stat()
    image_paths[0].write_bytes(replacement.read_bytes())
    os.utime(image_paths[0], ns=(previous.st_atime_ns, previous.st_mtime_ns))

    with pytest.raises(FeatureCacheMissError, match="image_0.png"):
        cache.features(image_paths[0])
    cache.build(rows)
    assert not torch.equal(cache.features(image_paths[0]), old_features)
    assert_float16_close(cache.features(image_paths[0]),
                         reference_features(frozen_model, tiny_processor, image_paths[0]))


def test_in_memory_images_are_keyed_by_content(frozen_model, tiny_processor, image_paths, cache_dir):
    def png_bytes(path):
        return path.read_bytes()

    images = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(path), "path": None} for path in image_paths], "caption": TINY_CAPTIONS[:3]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    undecoded = without_image_decoding(images)
    assert isinstance(undecoded[0]["image"], dict)

    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(undecoded)
    assert image_key(undecoded[0]).startswith("bytes:")
    assert_float16_close(cache.features(undecoded[0]), reference_features(frozen_model, tiny_processor, image_paths[0]))

    decoded_row = images[1]  # a PIL image: keyed by its pixels, so it needs its own build
    assert image_key(decoded_row).startswith("pixels:")
    cache.build([decoded_row])
    assert_float16_close(cache.features(decoded_row), reference_features(frozen_model, tiny_processor, image_paths[1]))
    changed = dict(decoded_row, image=Image.open(io.BytesIO(png_bytes(image_paths[2]))))
    assert image_key(changed) != image_key(decoded_row)


# ----------------------------------------------------------------------------------------------------------------
# Interrupted and concurrent builds


def fail_on_encoder_call(model, call_number: int):
    """Makes the encoder raise on its `call_number`-th call, as if the pre-pass were killed there."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == call_number:
            raise KeyboardInterrupt("pre-pass killed")

    return model.encoder.register_forward_pre_hook(hook)


def test_an_interrupted_build_is_not_used_and_is_rebuilt(frozen_model, tiny_processor, rows, image_paths, cache_dir):
    frozen_model.train()
    handle = fail_on_encoder_call(frozen_model, call_number=2)
    with pytest.raises(KeyboardInterrupt):
        EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows, batch_size=1)
    handle.remove()
    assert frozen_model.encoder.training  # encoded in eval mode, then put back as it was

    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor)
    assert len(cache) == 0 and not (cache.folder / INDEX_FILE).exists()
    with pytest.raises(FeatureCacheMissError):
        cache.features(image_paths[0])  # the row written before the interruption is not served

    counter = EncoderCalls(frozen_model)
    cache.build(rows, batch_size=1)
    assert sum(counter.images) == NUM_IMAGES
    for path in image_paths:
        assert_float16_close(cache.features(path), reference_features(frozen_model, tiny_processor, path))


def test_an_interrupted_build_resumes_from_its_last_checkpoint(
    frozen_model, tiny_processor, rows, image_paths, cache_dir
):
    handle = fail_on_encoder_call(frozen_model, call_number=3)
    with pytest.raises(KeyboardInterrupt):
        EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows, batch_size=1, checkpoint_every=1)
    handle.remove()

    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor)
    assert len(cache) == 2  # two images were committed before the third call failed
    counter = EncoderCalls(frozen_model)
    cache.build(rows, batch_size=1)
    assert counter.images == [1]
    for path in image_paths:
        assert_float16_close(cache.features(path), reference_features(frozen_model, tiny_processor, path))


def test_a_truncated_data_file_is_not_trusted(frozen_model, tiny_processor, rows, cache_dir):
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    with open(cache.folder / DATA_FILE, "r+b") as data:
        data.truncate(TOKENS * WIDTH * 2)  # one row left of three

    reopened = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor)
    assert len(reopened) == 0
    counter = EncoderCalls(frozen_model)
    reopened.build(rows)
    assert sum(counter.images) == NUM_IMAGES and len(reopened) == NUM_IMAGES


def test_a_full_disk_is_an_error_naming_it_not_a_crash(frozen_model, tiny_processor, rows, cache_dir, monkeypatch):
    """The features are written through a memory map, where a full disk kills the process with SIGBUS: the room is
    reserved before, so that the file system's refusal is an error that names the disk, and the cache stays unused."""
    import errno

    from modeling_vitgpt2.utils.io import DiskFullError

    def full_disk(descriptor, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(DiskFullError, match=f"{DATA_FILE}.*bytes needed"):
        EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    monkeypatch.undo()
    assert len(EncoderFeatureCache(cache_dir, frozen_model, tiny_processor)) == 0


def test_concurrent_builds_encode_each_image_once(frozen_model, tiny_processor, rows, image_paths, cache_dir):
    # Two builders of one folder, as two torchrun processes would be: the file lock lets one encode.
    counter = EncoderCalls(frozen_model)
    caches = [EncoderFeatureCache(cache_dir, frozen_model, tiny_processor) for _ in range(2)]
    errors = []

    def build(cache):
        try:
            cache.build(rows, batch_size=1)
        except Exception as error:  # surfaced below; a thread's exception would otherwise be lost
            errors.append(error)

    threads = [threading.Thread(target=build, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    assert sum(counter.images) == NUM_IMAGES
    reference = reference_features(frozen_model, tiny_processor, image_paths[1])
    for cache in caches:
        assert len(cache) == NUM_IMAGES
        assert_float16_close(cache.features(image_paths[1]), reference)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_a_missing_image_is_named(frozen_model, tiny_processor, rows, image_paths, cache_dir):
    image_paths[1].unlink()
    with pytest.raises(ImageLoadError, match="image file not found: .*image_1.png"):
        EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)


def test_an_unreadable_image_is_named(frozen_model, tiny_processor, rows, image_paths, cache_dir):
    image_paths[2].write_bytes(image_paths[2].read_bytes()[:60])  # truncated PNG
    with pytest.raises(ImageLoadError, match="cannot read image .*image_2.png"):
        EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)


def test_an_image_missing_from_the_cache_is_named(frozen_model, tiny_processor, rows, tmp_path, cache_dir):
    cache = EncoderFeatureCache(cache_dir, frozen_model, tiny_processor).build(rows)
    extra = write_random_png(tmp_path / "not_built.png", seed=7)
    collator = CachedFeatureCollator(CaptionCollator(tiny_processor), cache)
    with pytest.raises(FeatureCacheMissError, match="not_built.png.*build"):
        collator([{"image_path": str(extra), "caption": "a dog"}])


def test_a_trainable_encoder_is_refused(tiny_model, tiny_processor, rows, cache_dir):
    with pytest.raises(ValueError, match="requires_grad_"):
        EncoderFeatureCache(cache_dir, tiny_model, tiny_processor).build(rows)


def test_a_paged_out_encoder_computes_the_same_from_a_deleted_file_mapping(frozen_model, cache_dir):
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    encoder = frozen_model.get_encoder()
    with torch.inference_mode():
        before = encoder(pixels).last_hidden_state
    page_out_encoder(frozen_model, cache_dir)
    with torch.inference_mode():
        assert torch.equal(encoder(pixels).last_hidden_state, before)
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    assert list(cache_dir.iterdir()) == []  # unlinked at once; the mapping holds the data
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the weights now live in the mapping of the deleted file
        assert f"paged-out-encoder-{os.getpid()}.pt (deleted)" in maps.read_text()


def test_only_a_frozen_encoder_is_paged_out(tiny_model, cache_dir):
    with pytest.raises(ValueError, match="frozen"):
        page_out_encoder(tiny_model, cache_dir)


def test_reclaimed_pages_keep_their_contents():
    weights = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: whole pages inside it
    expected = weights.clone()
    advised = reclaim_pages([weights, torch.zeros(2)])  # a tensor smaller than a page is skipped
    if sys.platform == "linux" and tuple(map(int, os.uname().release.split("-")[0].split(".")[:2])) >= (5, 4):
        # MADV_PAGEOUT's first kernel
        assert 4 * 2**20 - 2 * mmap.PAGESIZE <= advised <= 4 * 2**20
    assert torch.equal(weights, expected)
