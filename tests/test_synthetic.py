"""The synthetic shapes dataset: deterministic, captions that match the pixels, and its tokenizer."""

import errno
import fcntl
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, GPT2Tokenizer

from modeling_vitgpt2.data.synthetic import (
    BACKGROUND,
    COLOURS,
    MAX_JITTER,
    POSITIONS,
    SIZES,
    Scene,
    ShapeObject,
    describe_scene,
    draw_scene,
    object_box,
    random_scene,
    synthetic_set,
    write_synthetic_coco,
)
from modeling_vitgpt2.training.tokenizer import train_caption_tokenizer
from modeling_vitgpt2.utils.errors import UserError

IMAGE_SIZE = 64


def _scenes(count, seed=0):
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def _files(root: Path) -> dict:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path):
    first = write_synthetic_coco(tmp_path / "a", num_train=12, num_val=4, seed=7, image_size=IMAGE_SIZE)
    second = write_synthetic_coco(tmp_path / "b", num_train=12, num_val=4, seed=7, image_size=IMAGE_SIZE)
    other = write_synthetic_coco(tmp_path / "c", num_train=12, num_val=4, seed=8, image_size=IMAGE_SIZE)

    assert _files(first.root) == _files(second.root)
    assert len(_files(first.root)) == 2 + 12 + 4
    assert _files(first.root)["train.json"] != _files(other.root)["train.json"]


def test_validation_images_do_not_depend_on_the_training_size(tmp_path):
    small = write_synthetic_coco(tmp_path / "small", num_train=3, num_val=4, seed=1)
    large = write_synthetic_coco(tmp_path / "large", num_train=9, num_val=4, seed=1)
    assert _files(small.val_images) == _files(large.val_images)


def test_coco_layout_with_ids_unique_across_splits(tmp_path):
    paths = write_synthetic_coco(tmp_path, num_train=5, num_val=3, seed=0)
    train, val = (json.loads(p.read_text()) for p in (paths.train_json, paths.val_json))

    for split, image_dir in ((train, paths.train_images), (val, paths.val_images)):
        assert {frozenset(image) for image in split["images"]} == {frozenset({"file_name", "id"})}
        assert {frozenset(a) for a in split["annotations"]} == {frozenset({"image_id", "caption", "id"})}
        assert all((image_dir / image["file_name"]).is_file() for image in split["images"])
        assert Counter(a["image_id"] for a in split["annotations"]) == {i["id"]: 4 for i in split["images"]}
    image_ids = [i["id"] for i in train["images"] + val["images"]]
    annotation_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(annotation_ids)) == len(annotation_ids)


def test_captions_of_a_given_scene():
    scene = Scene(
        (ShapeObject("square", "blue", "small", "right"), ShapeObject("circle", "red", "large", "left"))
    )
    assert describe_scene(scene) == [
        "a large red circle on the left and a small blue square on the right",
        "there is a big red circle on the left and a little blue square on the right",
        "on the left is a large red circle and on the right is a small blue square",
        "two shapes on a white background: a big red circle on the left and a little blue square on the right",
    ]
    three = Scene(
        (
            ShapeObject("triangle", "green", "small", "centre"),
            ShapeObject("diamond", "yellow", "large", "bottom"),
            ShapeObject("circle", "purple", "small", "top"),
        )
    )
    assert describe_scene(three)[1] == (
        "there is a little purple circle at the top, a little green triangle in the middle "
        "and a big yellow diamond at the bottom"
    )


def _read_object(pixels: np.ndarray, position: str):
    """Reads the object in one position's region back from the pixels: (shape, colour, size) or None."""
    centre_x, centre_y = POSITIONS[position]
    reach = (max(SIZES.values()) + MAX_JITTER) * IMAGE_SIZE
    left, right = int(centre_x * IMAGE_SIZE - reach), int(np.ceil(centre_x * IMAGE_SIZE + reach))
    top, bottom = int(centre_y * IMAGE_SIZE - reach), int(np.ceil(centre_y * IMAGE_SIZE + reach))
    region = pixels[top:bottom, left:right]
    filled = np.any(region != BACKGROUND, axis=-1)
    if not filled.any():
        return None
    colours = np.unique(region[filled], axis=0)
    assert len(colours) == 1, f"more than one colour at {position}: {colours}"
    colour = next(name for name, rgb in COLOURS.items() if rgb == tuple(colours[0]))

    rows, columns = np.nonzero(filled)
    filled = filled[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    height, width = filled.shape
    size = "large" if width / IMAGE_SIZE > (SIZES["large"] + SIZES["small"]) else "small"
    fill_ratio = filled.mean()
    widest_row = int(np.argmax(filled.sum(axis=1)))
    if fill_ratio > 0.95:
        shape = "square"
    elif fill_ratio > 0.7:
        shape = "circle"
    elif widest_row > 0.75 * height:
        shape = "triangle"
    else:
        shape = "diamond"
    return shape, colour, size


def test_captions_agree_with_the_drawn_image():
    """Reading every position back from the pixels gives a scene with exactly the same captions."""
    for scene in _scenes(200):
        pixels = np.asarray(draw_scene(scene, IMAGE_SIZE))
        seen = []
        for position in POSITIONS:
            found = _read_object(pixels, position)
            if found is not None:
                seen.append(ShapeObject(*found, position=position))
        assert describe_scene(Scene(tuple(seen))) == describe_scene(scene), scene


def test_objects_never_overlap_and_stay_inside_the_image():
    for scene in _scenes(500, seed=3):
        boxes = [object_box(obj, IMAGE_SIZE) for obj in scene.objects]
        for left, top, right, bottom in boxes:
            assert 0 <= left < right <= IMAGE_SIZE and 0 <= top < bottom <= IMAGE_SIZE
        for index, a in enumerate(boxes):
            for b in boxes[index + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)


def test_invalid_scenes_are_refused():
    with pytest.raises(ValueError, match="share a position"):
        Scene((ShapeObject("circle", "red", "large", "left"), ShapeObject("square", "blue", "small", "left")))
    with pytest.raises(ValueError, match="hexagon"):
        ShapeObject("hexagon", "red", "large", "left")


def test_every_image_has_at_least_three_distinct_references_from_a_small_vocabulary():
    scenes = _scenes(1000, seed=5)
    words = set()
    for scene in scenes:
        captions = describe_scene(scene)
        assert len(set(captions)) == len(captions) >= 3
        words.update(word for caption in captions for word in caption.replace(":", " ").replace(",", " ").split())
    assert len(words) <= 40, sorted(words)
    assert {len(scene.objects) for scene in scenes} == {1, 2, 3}


def test_tokenizer_round_trip_and_offline_save_load(tmp_path):
    captions = [caption for scene in _scenes(300) for caption in describe_scene(scene)]
    tokenizer = train_caption_tokenizer(captions, vocab_size=1000, save_dir=tmp_path / "tokenizer")

    assert isinstance(tokenizer, GPT2Tokenizer)
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.all_special_tokens == ["<|endoftext|>"]
    assert len(tokenizer) <= 1000
    for caption in captions[:50]:
        ids = tokenizer(caption)["input_ids"]
        assert tokenizer.eos_token_id not in ids  # GPT-2 style: no special tokens added by the tokenizer
        assert tokenizer.decode(ids) == caption
        assert len(ids) <= len(caption.split()) + 2  # every word (and ':') is one token after training
    # Text the captions never used still round-trips through the byte-level alphabet.
    assert tokenizer.decode(tokenizer("Zebra crossing, 42 Ω!")["input_ids"]) == "Zebra crossing, 42 Ω!"

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)
    assert type(reloaded) is GPT2Tokenizer
    assert reloaded.pad_token_id == reloaded.eos_token_id == reloaded.bos_token_id == tokenizer.eos_token_id
    assert reloaded(captions[:20])["input_ids"] == tokenizer(captions[:20])["input_ids"]


def test_shifted_domain_draws_new_colours_and_words_captions_differently(tmp_path):
    from modeling_vitgpt2.data.synthetic import DOMAINS, SHIFTED_COLOURS

    shifted = write_synthetic_coco(tmp_path / "shifted", num_train=30, num_val=4, seed=0, domain="shifted")
    default = write_synthetic_coco(tmp_path / "default", num_train=30, num_val=4, seed=0)
    shifted_captions = [a["caption"] for a in json.loads(shifted.train_json.read_text())["annotations"]]
    default_captions = [a["caption"] for a in json.loads(default.train_json.read_text())["annotations"]]
    shifted_words = {word for caption in shifted_captions for word in caption.replace(":", "").split()}
    default_words = {word for caption in default_captions for word in caption.replace(":", "").split()}
    assert set(SHIFTED_COLOURS) & shifted_words and not set(SHIFTED_COLOURS) & default_words
    assert {"image", "shows", "we", "see"} <= shifted_words - default_words
    assert not set(shifted_captions) & set(default_captions)
    assert set(DOMAINS["shifted"]) - set(COLOURS) == set(SHIFTED_COLOURS)
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        write_synthetic_coco(tmp_path / "x", num_train=1, num_val=1, domain="stripes")


def test_options_left_to_their_defaults_name_the_same_synthetic_set_as_given_in_full(tmp_path):
    # The study gives all four options, a caller of `synthetic_set` may leave some out: one set either way.
    lines = []
    with synthetic_set(tmp_path, {"num_train": 2, "num_val": 1, "image_size": 16}, lines.append) as paths:
        assert len(json.loads(paths.val_json.read_text())["images"]) == 1
        assert sorted(path.name for path in paths.train_images.iterdir()) == ["train_000000.png", "train_000001.png"]
    with synthetic_set(tmp_path, {"num_train": 2, "num_val": 1, "image_size": 16, "domain": "shapes"}, lines.append):
        pass
    assert lines == [f"writing the synthetic 'shapes' set (2 training and 1 validation images) to {tmp_path}"]


TINY = {"num_train": 2, "num_val": 1, "image_size": 16, "domain": "shapes"}


def refuse_lock_file_writes(monkeypatch, root: Path) -> None:
    """Makes `root`'s lock files behave as for a user who may neither create one there (a read-only folder) nor open
    one for writing (another user's, 0644): the tests run as root, whom file modes do not stop."""
    real_open = os.open

    def guarded(path, flags, *args, **kwargs):
        path = Path(path)
        if path.parent == root and path.name.startswith(".synthetic.") and flags & (os.O_RDWR | os.O_CREAT):
            exists = path.exists()
            if (flags & os.O_CREAT and not exists) or (exists and not flags & os.O_EXCL):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


def test_lock_files_are_created_writable_for_every_user_whatever_the_umask(tmp_path):
    # Created 0644 under the usual umask, another user sharing the folder could not open them to take the locks.
    mask = os.umask(0o022)
    try:
        with synthetic_set(tmp_path, TINY, lambda line: None):
            pass
    finally:
        os.umask(mask)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in tmp_path.glob(".synthetic.*")} == {
        ".synthetic.write.lock": "0o666", ".synthetic.in-use.lock": "0o666"}


def test_lock_files_another_user_wrote_are_locked_through_read_only_descriptors(tmp_path, monkeypatch):
    # Permission denied opening them for writing stopped every run of another user, even with the set written.
    with synthetic_set(tmp_path, TINY, lambda line: None):
        pass
    refuse_lock_file_writes(monkeypatch, tmp_path)
    lines = []
    with synthetic_set(tmp_path, TINY, lines.append) as paths:
        assert paths.train_json.is_file() and lines == []
        with pytest.raises(UserError, match="holds the synthetic set of another running"):  # still locked in use
            with synthetic_set(tmp_path, {**TINY, "num_val": 2}, lines.append):
                pass
    with synthetic_set(tmp_path, {**TINY, "num_val": 2}, lines.append):  # the folder itself is writable
        assert len(json.loads((tmp_path / "val.json").read_text())["images"]) == 2


def test_a_read_only_folder_holding_the_set_is_used_without_locks_and_one_without_it_is_refused(tmp_path,
                                                                                              monkeypatch):
    # A set prepared once in a read-only folder stopped every run: its lock files could not be created.
    with synthetic_set(tmp_path, TINY, lambda line: None):
        pass
    for lock in tmp_path.glob(".synthetic.*"):
        lock.unlink()
    refuse_lock_file_writes(monkeypatch, tmp_path)
    lines = []
    with synthetic_set(tmp_path, TINY, lines.append) as paths:
        assert paths.val_json.is_file()
    assert lines == [f"using the synthetic set in {tmp_path} without locks: its lock files cannot be created there "
                     "(a read-only folder?), and it holds the set of these options"]
    with pytest.raises(UserError, match=re.escape(
            f"cannot write the synthetic set of this study ({ {**TINY, 'num_val': 2} }) to {tmp_path} (its lock files "
            f"cannot be created, and it holds {TINY}): set data.synthetic_dir to a folder this user can write")):
        with synthetic_set(tmp_path, {**TINY, "num_val": 2}, lines.append, job="study", setting="data.synthetic_dir"):
            pass
    assert not list(tmp_path.glob(".synthetic.*"))


@pytest.mark.parametrize("content", [b"not json{", b"", b'{"num_train": 2,', b"\xff\xfe garbage"],
                         ids=["garbage", "empty", "truncated", "not-utf-8"])
def test_an_unreadable_marker_counts_as_none_and_the_set_is_written_again(tmp_path, content):
    # It raised InvalidJSONError advising to fix by hand a file this module writes.
    marker = tmp_path / "written.json"
    marker.parent.mkdir(exist_ok=True)
    marker.write_bytes(content)
    lines = []
    with synthetic_set(tmp_path, TINY, lines.append):
        pass
    assert re.fullmatch(rf"{re.escape(str(marker))} cannot be read \(.+\): writing the synthetic set again", lines[0])
    assert lines[1:] == [f"writing the synthetic 'shapes' set (2 training and 1 validation images) to {tmp_path}"]
    assert json.loads(marker.read_text()) == TINY


def test_an_unreadable_marker_of_a_set_in_use_is_not_rewritten(tmp_path):
    with synthetic_set(tmp_path, TINY, lambda line: None):
        (tmp_path / "written.json").write_text("{")
        with pytest.raises(UserError, match=r"holds the synthetic set of another running study or training run "
                                            r"\(unknown\)"):
            with synthetic_set(tmp_path, TINY, lambda line: None):
                pass


def test_a_failure_to_open_the_in_use_lock_releases_the_write_lock(tmp_path):
    # The write lock stayed held, so a retry in the same process (a notebook cell run again) waited forever.
    (tmp_path / ".synthetic.in-use.lock").mkdir()
    with pytest.raises(IsADirectoryError) as raised:  # kept, as IPython keeps the last error and its frames
        with synthetic_set(tmp_path, TINY, lambda line: None):
            pass
    descriptor = os.open(tmp_path / ".synthetic.write.lock", os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while still held
    finally:
        os.close(descriptor)
    assert raised.traceback  # alive until here


def test_the_images_are_on_disk_before_the_marker_names_them(tmp_path, monkeypatch):
    # The marker is fsynced, the PNGs were not: after a power cut it could name a set of empty files.
    from modeling_vitgpt2.data import synthetic

    events = []
    real_sync, real_write = os.sync, synthetic.write_json_atomic
    monkeypatch.setattr(os, "sync", lambda: events.append("sync") or real_sync())

    def logged_write(path, *args, **kwargs):
        events.append(Path(path).name)
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(synthetic, "write_json_atomic", logged_write)
    with synthetic_set(tmp_path, TINY, lambda line: None):
        pass
    assert events == ["train.json", "val.json", "sync", "written.json"]
