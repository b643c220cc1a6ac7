"""CLIPScore / RefCLIPScore match a direct computation with the same CLIP model on real images."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import direct_embeddings
from modeling_vitgpt2.evaluation.clip_score import (
    DEFAULT_CLIP_MODEL,
    HESSEL_PREFIX,
    ClipScoreResult,
    LoadedClip,
    clip_score,
    load_clip,
)
from modeling_vitgpt2.model.processing_vitgpt2 import ImageLoadError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

METRICS_DIR = Path(__file__).resolve().parents[1] / "evaluate_metrics"


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return load_clip(tiny_clip, device="cpu")


@pytest.fixture(scope="module")
def real_images(shared_data, tmp_path_factory):
    """RGB photos from the shared data (copied at most 160 px on a side, to decode fast), with a caption and two
    references each."""
    folder = shared_data / "real_images"
    descriptions = json.loads((folder / "skimage" / "descriptions.json").read_text())["descriptions"]
    example_refs = json.loads((folder / "clipscore_example" / "refs.json").read_text())
    example_good = json.loads((folder / "clipscore_example" / "good_captions.json").read_text())
    items = [(folder / "clipscore_example" / f"{key}.jpg", example_good[key], example_refs[key][:2])
             for key in ("image1", "image2")]
    for name, file in [("astronaut", "astronaut.png"), ("chelsea", "chelsea.png"), ("coffee", "coffee.png"),
                       ("rocket", "rocket.jpg"), ("motorcycle_right", "motorcycle_right.png")]:
        items.append((folder / "skimage" / file, descriptions[name], [f"This is {descriptions[name]}", name]))
    items.append((folder / "git_examples" / "1.jpg", "a couple of boats in a large body of water.",
                  ["boats on a lake", "a harbour"]))
    small = tmp_path_factory.mktemp("real_images")
    for index, (source, caption, refs) in enumerate(items):
        picture = Image.open(source).convert("RGB")
        picture.thumbnail((160, 160))
        copy = small / f"{index}_{source.name}"
        picture.save(copy)
        items[index] = (copy, caption, refs)
    paths, captions, references = map(list, zip(*items))
    return paths, captions, references


def test_load_clip_from_a_local_folder(clip):
    assert isinstance(clip, LoadedClip)
    assert not clip.model.training and clip.device == torch.device("cpu")


def test_clip_score_matches_direct_computation(tiny_clip, real_images):
    paths, captions, _ = real_images
    image_embeddings, text_embeddings = direct_embeddings(tiny_clip, paths, captions)
    cosine = (image_embeddings * text_embeddings).sum(-1)
    assert (cosine > 0).any() and (cosine < 0).any()  # premise: both sides of max(cos, 0) are tested
    expected = (2.5 * cosine.clamp_min(0)).tolist()

    result = clip_score(paths, captions, clip=str(tiny_clip), batch_size=4, progress=False)
    assert isinstance(result, ClipScoreResult)
    assert result.per_image == pytest.approx(expected, abs=1e-5)
    assert result.score == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert result.ref_score is None and result.ref_per_image is None


def test_hessel_prefix_variant(tiny_clip, clip, real_images):
    paths, captions, _ = real_images
    image_embeddings, text_embeddings = direct_embeddings(tiny_clip, paths, ["A photo depicts " + c for c in captions])
    expected = (2.5 * (image_embeddings * text_embeddings).sum(-1).clamp_min(0)).tolist()
    result = clip_score(paths, captions, clip=clip, prefix=HESSEL_PREFIX, progress=False)
    assert result.per_image == pytest.approx(expected, abs=1e-5)


def test_ref_clip_score_matches_direct_harmonic_mean(tiny_clip, clip, real_images):
    paths, captions, references = real_images
    flat = [ref for refs in references for ref in refs]
    image_embeddings, text_embeddings = direct_embeddings(tiny_clip, paths, captions + flat)
    caption_embeddings, reference_embeddings = text_embeddings[:len(captions)], text_embeddings[len(captions):]
    expected, start = [], 0
    for index, refs in enumerate(references):
        clip_s = 2.5 * max(float(image_embeddings[index] @ caption_embeddings[index]), 0.0)
        own_references = reference_embeddings[start:start + len(refs)]
        start += len(refs)
        best = max(float(caption_embeddings[index] @ reference) for reference in own_references)
        text_side = max(best, 0.0)
        expected.append(0.0 if clip_s + text_side == 0 else 2 * clip_s * text_side / (clip_s + text_side))

    assert 0.0 in expected  # premise: an image whose CLIP-S is 0 makes the harmonic mean 0
    result = clip_score(paths, captions, references, clip=clip, progress=False)
    assert result.ref_per_image == pytest.approx(expected, abs=1e-5)
    assert result.ref_score == pytest.approx(sum(expected) / len(expected), abs=1e-6)


def test_batch_size_and_input_kind_do_not_change_scores(clip, real_images):
    paths, captions, _ = real_images
    by_path = clip_score(paths, captions, clip=clip, batch_size=len(paths), progress=False)
    one_by_one = clip_score(paths, captions, clip=clip, batch_size=1, progress=False)
    as_pil = clip_score([Image.open(path) for path in paths], captions, clip=clip, batch_size=3, progress=False)
    assert one_by_one.per_image == pytest.approx(by_path.per_image, abs=1e-5)
    assert as_pil.per_image == pytest.approx(by_path.per_image, abs=1e-5)


def test_dict_inputs_give_per_image_dicts(clip, real_images):
    paths, captions, references = real_images
    names = [path.stem for path in paths]
    result = clip_score(dict(zip(names, paths)), dict(zip(names, captions)), dict(zip(names, references)),
                        clip=clip, progress=False)
    as_lists = clip_score(paths, captions, references, clip=clip, progress=False)
    assert list(result.per_image) == names
    assert list(result.per_image.values()) == pytest.approx(as_lists.per_image, abs=1e-6)
    assert list(result.ref_per_image.values()) == pytest.approx(as_lists.ref_per_image, abs=1e-6)


def test_bad_inputs_raise_clear_errors(clip, real_images, tmp_path):
    paths, captions, _ = real_images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        clip_score([paths[0], broken], captions[:2], clip=clip, progress=False)
    with pytest.raises(ImageLoadError, match="missing.png"):
        clip_score([tmp_path / "missing.png"], ["a cat"], clip=clip, progress=False)
    with pytest.raises(ValueError, match="no captions"):
        clip_score([], [], clip=clip, progress=False)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        clip_score(paths[:2], captions[:1], clip=clip, progress=False)
    with pytest.raises(ValueError, match="non-empty list"):
        clip_score(paths[:2], captions[:2], [["a ref"], []], clip=clip, progress=False)
    with pytest.raises(ValueError, match="'b'"):
        clip_score({"a": paths[0]}, {"a": "x", "b": "y"}, clip=clip, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        clip_score(paths[:1], captions[:1], clip=clip, batch_size=0, progress=False)


def test_load_clip_explains_what_to_pass(tmp_path):
    with pytest.raises(OSError, match="local folder"):
        load_clip(tmp_path / "no_such_model")


def test_evaluate_module_gives_the_same_values(tiny_clip, clip, real_images, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)  # a local module may fetch nothing
    paths, captions, references = real_images
    module = evaluate.load(str(METRICS_DIR / "clipscore"))
    direct = clip_score(paths, captions, references, clip=clip, progress=False)

    plain = module.compute(predictions=captions, images=[str(path) for path in paths], clip_model=str(tiny_clip),
                           progress=False)
    assert plain["clip_score"] == pytest.approx(direct.score, abs=1e-6)
    assert plain["clip_score_per_image"] == pytest.approx(direct.per_image, abs=1e-6)
    assert "ref_clip_score" not in plain

    # PIL images work too (`evaluate` stores them as PNG, so keep them small to stay fast)
    thumbnails = [Image.open(path).convert("RGB").resize((48, 48)) for path in paths]
    direct_pil = clip_score(thumbnails, captions, references, clip=clip, progress=False)
    with_refs = module.compute(predictions=captions, images=thumbnails, references=references,
                               clip_model=str(tiny_clip), progress=False)
    assert with_refs["clip_score"] == pytest.approx(direct_pil.score, abs=1e-5)
    assert with_refs["ref_clip_score"] == pytest.approx(direct_pil.ref_score, abs=1e-5)
    assert with_refs["ref_clip_score_per_image"] == pytest.approx(direct_pil.ref_per_image, abs=1e-5)


def test_published_clipscore_example_with_the_real_model(shared_data):
    """Hessel et al.'s example (0.8585 fp32 / 0.7153); runs only where OpenAI's ViT-B/32 is already cached."""
    try:
        clip = load_clip(DEFAULT_CLIP_MODEL, device="cpu")
    except OSError:
        pytest.skip(f"{DEFAULT_CLIP_MODEL} is not available offline")
    folder = shared_data / "real_images" / "clipscore_example"
    images = {key: folder / f"{key}.jpg" for key in ("image1", "image2")}
    good = json.loads((folder / "good_captions.json").read_text())
    bad = json.loads((folder / "bad_captions.json").read_text())
    assert clip_score(images, good, clip=clip, prefix=HESSEL_PREFIX, progress=False).score == pytest.approx(
        0.8585, abs=2e-4)
    assert clip_score(images, bad, clip=clip, prefix=HESSEL_PREFIX, progress=False).score == pytest.approx(
        0.7153, abs=2e-4)
