"""The processor: any image mode in, the encoder's pixels out; prompts and teacher-forcing batches; clear errors."""

import numpy as np
import pytest
from PIL import Image

from modeling_vitgpt2 import ImageLoadError


def test_any_image_mode_becomes_rgb_pixels(tiny_processor, tmp_path):
    gradient = np.linspace(0, 1, 40 * 30).reshape(40, 30)
    images = [
        Image.fromarray((gradient * 255).astype(np.uint8)),  # grayscale
        Image.fromarray((gradient * 65535).astype(np.uint16)),  # 16-bit
        Image.new("RGBA", (30, 40), (255, 0, 0, 128)),
        Image.new("RGB", (30, 40), (0, 128, 255)).convert("P"),
        (gradient[..., None].repeat(3, -1) * 255).astype(np.uint8),  # numpy HxWx3
    ]
    path = tmp_path / "gray16.png"
    images[1].save(path)
    pixels = tiny_processor(images=images + [path])["pixel_values"]
    assert pixels.shape == (6, 3, 28, 28)
    # The 16-bit file read from disk and the in-memory one give the same pixels.
    np.testing.assert_allclose(pixels[1].numpy(), pixels[5].numpy(), atol=1e-6)


@pytest.mark.parametrize("content", [b"this is not an image", None], ids=["not-an-image", "truncated"])
def test_unreadable_image_files_are_named(tiny_processor, tmp_path, content):
    path = tmp_path / "broken.jpg"
    if content is None:
        Image.new("RGB", (64, 64), (10, 200, 30)).save(path, quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        tiny_processor(images=[path])


def test_decompression_bombs_are_refused_by_name(tiny_processor, tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 megapixels in a ~50 kB file
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match="bomb.png: it is 400,000,000 pixels, more than the limit of 89,478,485 .a guard against decompression bombs"):
        tiny_processor(images=[path])


def test_missing_image_file_is_named(tiny_processor, tmp_path):
    with pytest.raises(ImageLoadError, match="nowhere.png"):
        tiny_processor(images=str(tmp_path / "nowhere.png"))


def test_prompts_are_left_padded_after_the_start_token(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    batch = tiny_processor(text=["a red circle", "a"])
    start, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    long_ids = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert batch["decoder_input_ids"][0].tolist() == [start] + long_ids
    short = batch["decoder_input_ids"][1].tolist()
    assert short[-2:] == [start, tokenizer("a", add_special_tokens=False)["input_ids"][0]]
    assert short[: len(short) - 2] == [pad] * (len(short) - 2)
    assert batch["decoder_attention_mask"][1].tolist() == [0] * (len(short) - 2) + [1, 1]


def test_training_captions_keep_the_end_token_in_the_labels(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    batch = tiny_processor.tokenize_captions(["a red circle", "a dog"])
    tokens = tokenizer("a dog", add_special_tokens=False)["input_ids"]
    width = batch["labels"].shape[1]
    assert batch["labels"][1].tolist() == tokens + [tokenizer.eos_token_id] + [-100] * (width - len(tokens) - 1)
    assert batch["decoder_input_ids"][1, : len(tokens) + 1].tolist() == [tokenizer.eos_token_id] + tokens
    with pytest.raises(ValueError, match=r"captions\[1\] is empty"):
        tiny_processor.tokenize_captions(["a dog", "  "])


def test_decoding_drops_special_tokens(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    ids = [tokenizer.eos_token_id] + tokenizer("a red circle", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tiny_processor.batch_decode([ids]) == ["a red circle"]


def test_wrong_inputs_are_explained(tiny_processor):
    with pytest.raises(ValueError, match="images"):
        tiny_processor()
    with pytest.raises(ImageLoadError, match="images\\[0\\]"):
        tiny_processor(images=[np.zeros((4, 4, 5), dtype=np.uint8)])
    with pytest.raises(ImageLoadError, match=r"images\[1\]: expected a uint8 array \(0-255\), got float64"):
        tiny_processor(images=[np.zeros((4, 4, 3), dtype=np.uint8), np.random.rand(4, 4, 3)])


def test_one_pixel_limit_refuses_an_image_from_its_header_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from helpers import huge_png
    from modeling_vitgpt2.model.processing_vitgpt2 import ImageTooLargeError, as_rgb_image, load_image

    path = huge_png(tmp_path / "huge.png")  # 144 Mpx: Pillow itself refuses only above 178,956,970
    assert path.stat().st_size < 100_000

    def no_decoding(self):
        raise AssertionError("decoded an image the limit refuses")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    figure = r"12,000 x 12,000 = 144,000,000 pixels, more than the limit of 89,478,485"
    how = "VITGPT2_MAX_IMAGE_PIXELS=144000000"
    for load in (lambda: load_image(path), lambda: as_rgb_image({"bytes": path.read_bytes(), "path": "huge.png"})):
        with pytest.raises(ImageTooLargeError, match=f"huge.png: it is {figure}.*{how}"):
            load()


def test_the_pixel_limit_is_set_by_environment_or_argument_even_past_pillows_own(tmp_path, monkeypatch):
    from modeling_vitgpt2.model.processing_vitgpt2 import ImageTooLargeError, as_rgb_image, load_image

    path = tmp_path / "fifty.png"
    Image.new("L", (50, 50)).save(path)  # 2,500 pixels
    monkeypatch.setenv("VITGPT2_MAX_IMAGE_PIXELS", "2,000")
    with pytest.raises(ImageTooLargeError, match="50 x 50 = 2,500 pixels, more than the limit of 2,000"):
        load_image(path)
    assert load_image(path, max_pixels=2_500).size == (50, 50)
    monkeypatch.setenv("VITGPT2_MAX_IMAGE_PIXELS", "2500")
    # Pillow alone would refuse above twice its own figure (here 200): the configured limit is the one that counts.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert as_rgb_image(path).size == (50, 50)
    monkeypatch.setenv("VITGPT2_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="VITGPT2_MAX_IMAGE_PIXELS='lots' is not a number of pixels"):
        load_image(path)
    import pickle

    error = pickle.loads(pickle.dumps(ImageTooLargeError("huge.png", (3, 4), 12, 10)))
    assert str(error).startswith("refusing to decode image huge.png: it is 3 x 4 = 12 pixels, more than the limit of 10")
