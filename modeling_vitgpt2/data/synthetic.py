"""The built-in default dataset: coloured shapes on a white background, with several correct captions per image.

It exists so that training, evaluation (CIDEr needs several references per image) and the tests run offline in a few
minutes on a CPU. Everything is generated deterministically from a seed and written in the course's COCO layout, so
training reads it through the same loader as real data (`modeling_vitgpt2.data.captions.load_coco_captions`).
train.py and the study get it through `synthetic_set`, which writes it once per set of options into a folder they may
share, and keeps it from being rewritten while one of them reads it.

A scene holds one to three objects, each with a shape, a colour, a size and one of five positions. Every position has
its own region of the image, so objects never overlap and every caption can name each object's position unambiguously.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..utils.errors import UserError
from ..utils.io import InvalidJSONError, read_json, write_json_atomic

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DEFAULT_DOMAIN",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "describe_scene",
    "DOMAINS",
    "draw_scene",
    "MAX_JITTER",
    "MAX_OBJECTS",
    "object_box",
    "PALETTE",
    "POSITIONS",
    "random_scene",
    "Scene",
    "ShapeObject",
    "SHAPES",
    "SHIFTED_COLOURS",
    "SIZES",
    "SYNTHETIC_IN_USE_LOCK",
    "SYNTHETIC_WRITE_LOCK",
    "SyntheticCocoPaths",
    "synthetic_set",
    "WRITTEN_MARKER",
    "write_synthetic_coco",
]


# The built-in set's size and look: `write_synthetic_coco`'s defaults, and train.py's `--synthetic_*` ones.
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 200
DEFAULT_IMAGE_SIZE = 64
DEFAULT_DOMAIN = "shapes"

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
}
# Colours only the "shifted" domain draws: new pixels that need new words, for studies of adapting a trained captioner.
SHIFTED_COLOURS = {
    "orange": (245, 130, 20),
    "pink": (240, 120, 190),
    "cyan": (30, 190, 210),
}
PALETTE = {**COLOURS, **SHIFTED_COLOURS}
# "shapes" is the default set; "shifted" draws two old and three new colours and words its captions differently.
DOMAINS = {"shapes": tuple(COLOURS), "shifted": ("red", "blue", *SHIFTED_COLOURS)}
# Half the side of an object's bounding box, as a fraction of the image side.
SIZES = {"large": 0.11, "small": 0.06}
# Centre of each position's region, as fractions (x, y) of the image side; listed in the order captions name them.
POSITIONS = {
    "top": (0.5, 0.2),
    "left": (0.2, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom": (0.5, 0.8),
}
# Objects are nudged by up to this fraction of the image side so that a model cannot key on exact pixels. With the
# sizes above, neighbouring regions stay apart: 0.2 + 0.03 + 0.11 = 0.34 < 0.5 - 0.03 - 0.11 = 0.36.
MAX_JITTER = 0.03
MAX_OBJECTS = 3
BACKGROUND = (255, 255, 255)

_WHERE = {
    "top": "at the top",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom": "at the bottom",
}
_WHERE_ALTERNATIVE = {**_WHERE, "centre": "in the middle"}
_SIZE_ALTERNATIVE = {"large": "big", "small": "little"}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. `offset` is its (dx, dy) nudge from the position's centre, in fractions of the image."""

    shape: str
    colour: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        for value, allowed in (
            (self.shape, SHAPES),
            (self.colour, PALETTE),
            (self.size, SIZES),
            (self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown value {value!r}; choose one of {list(allowed)}")
        if max(abs(self.offset[0]), abs(self.offset[1])) > MAX_JITTER:
            raise ValueError(f"offset {self.offset} is larger than MAX_JITTER={MAX_JITTER}; objects could overlap")


@dataclass(frozen=True)
class Scene:
    """One to three objects at distinct positions (which is what keeps them from overlapping)."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        positions = [obj.position for obj in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position in {positions}; give each object its own position")


def random_scene(rng: random.Random, colours: Sequence[str] = tuple(COLOURS)) -> Scene:
    """Draws a scene: 1-3 objects, each at its own position with a random shape, colour (from `colours`), size and
    small nudge."""
    count = rng.randint(1, MAX_OBJECTS)
    positions = rng.sample(list(POSITIONS), count)
    objects = tuple(
        ShapeObject(
            shape=rng.choice(SHAPES),
            colour=rng.choice(list(colours)),
            size=rng.choice(list(SIZES)),
            position=position,
            offset=(rng.uniform(-MAX_JITTER, MAX_JITTER), rng.uniform(-MAX_JITTER, MAX_JITTER)),
        )
        for position in positions
    )
    return Scene(objects)


def object_box(obj: ShapeObject, image_size: int) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) pixel box the object is drawn in."""
    centre_x, centre_y = POSITIONS[obj.position]
    x = (centre_x + obj.offset[0]) * image_size
    y = (centre_y + obj.offset[1]) * image_size
    half = SIZES[obj.size] * image_size
    return (x - half, y - half, x + half, y + half)


def draw_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Renders a scene as an RGB image of `image_size` x `image_size` pixels."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        left, top, right, bottom = object_box(obj, image_size)
        middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(middle_x, top), (right, bottom), (left, bottom)], fill=fill)
        else:  # diamond
            draw.polygon([(middle_x, top), (right, middle_y), (middle_x, bottom), (left, middle_y)], fill=fill)
    return image


def _in_caption_order(scene: Scene) -> list[ShapeObject]:
    # One fixed order (top, left, centre, right, bottom) across all captions keeps the structure easy to learn.
    order = list(POSITIONS)
    return sorted(scene.objects, key=lambda obj: order.index(obj.position))


def _join(phrases: Sequence[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_scene(scene: Scene, domain: str = "shapes") -> list[str]:
    """Four differently worded captions, all correct, for the scene (lower case, no final full stop).

    For a large red circle on the left and a small blue square on the right:
      - a large red circle on the left and a small blue square on the right
      - there is a big red circle on the left and a little blue square on the right
      - on the left is a large red circle and on the right is a small blue square
      - two shapes on a white background: a big red circle on the left and a little blue square on the right
    """
    if domain == "shifted":
        return _describe_shifted(scene)
    objects = _in_caption_order(scene)
    plain = [f"a {o.size} {o.colour} {o.shape} {_WHERE[o.position]}" for o in objects]
    alternative = [
        f"a {_SIZE_ALTERNATIVE[o.size]} {o.colour} {o.shape} {_WHERE_ALTERNATIVE[o.position]}" for o in objects
    ]
    location_first = [f"{_WHERE[o.position]} is a {o.size} {o.colour} {o.shape}" for o in objects]
    count = len(objects)
    counted = f"{_COUNT_WORDS[count]} {'shape' if count == 1 else 'shapes'} on a white background: "
    return [
        _join(plain),
        "there is " + _join(alternative),
        _join(location_first),
        counted + _join(alternative),
    ]


def _describe_shifted(scene: Scene) -> list[str]:
    """The "shifted" domain's four captions: other words and sentence shapes than `describe_scene`'s, e.g.

      - the image shows a large orange circle on the left and a small pink square on the right
      - two objects: orange circle on the left and pink square on the right
      - on the left we see a large orange circle and on the right we see a small pink square
      - large orange circle on the left and small pink square on the right
    """
    objects = _in_caption_order(scene)
    count = len(objects)
    return [
        "the image shows " + _join([f"a {o.size} {o.colour} {o.shape} {_WHERE[o.position]}" for o in objects]),
        f"{_COUNT_WORDS[count]} {'object' if count == 1 else 'objects'}: "
        + _join([f"{o.colour} {o.shape} {_WHERE[o.position]}" for o in objects]),
        _join([f"{_WHERE[o.position]} we see a {o.size} {o.colour} {o.shape}" for o in objects]),
        _join([f"{o.size} {o.colour} {o.shape} {_WHERE[o.position]}" for o in objects]),
    ]


@dataclass(frozen=True)
class SyntheticCocoPaths:
    """Where `write_synthetic_coco` put each split (the course's COCO layout)."""

    root: Path
    train_json: Path
    val_json: Path
    train_images: Path
    val_images: Path

    @classmethod
    def under(cls, root: str | Path) -> SyntheticCocoPaths:
        root = Path(root)
        return cls(root=root, train_json=root / "train.json", val_json=root / "val.json",
                   train_images=root / "train", val_images=root / "val")


def _write_split(
    root: Path,
    split: str,
    count: int,
    seed: int,
    image_size: int,
    image_ids: Iterator[int],
    annotation_ids: Iterator[int],
    domain: str,
) -> None:
    # A separate random stream per split, so changing num_train does not change the validation images.
    rng = random.Random(f"synthetic-shapes:{seed}:{split}" + ("" if domain == "shapes" else f":{domain}"))
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image_id = next(image_ids)
        file_name = f"{split}_{index:06d}.png"
        scene = random_scene(rng, DOMAINS[domain])
        draw_scene(scene, image_size).save(image_dir / file_name, format="PNG")
        images.append({"file_name": file_name, "id": image_id})
        for caption in describe_scene(scene, domain):
            annotations.append({"image_id": image_id, "caption": caption, "id": next(annotation_ids)})
    write_json_atomic(root / f"{split}.json", {"images": images, "annotations": annotations}, indent=1)


def write_synthetic_coco(
    out_dir: str | Path,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    domain: str = DEFAULT_DOMAIN,
) -> SyntheticCocoPaths:
    """Writes the synthetic shapes dataset as `train.json`, `val.json`, `train/*.png` and `val/*.png` under `out_dir`.

    The same arguments always give byte-identical files. Image ids and annotation ids are unique across both splits.
    Each image has the four captions of `describe_scene` in `domain` ("shapes", or "shifted": new colours and new
    phrasing, the target of the built-in PEFT study).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose one of {list(DOMAINS)}")
    root = Path(out_dir)
    # Shared counters keep ids unique across the splits, as in one COCO release.
    image_ids, annotation_ids = itertools.count(), itertools.count()
    _write_split(root, "train", num_train, seed, image_size, image_ids, annotation_ids, domain)
    _write_split(root, "val", num_val, seed, image_size, image_ids, annotation_ids, domain)
    return SyntheticCocoPaths.under(root)


# In the synthetic set's folder, which train.py runs and studies may share (`synthetic_set`): the options the set was
# written with; a lock held while one checks and writes the set; and one held shared by every run that reads it.
WRITTEN_MARKER = "written.json"
SYNTHETIC_WRITE_LOCK = ".synthetic.write.lock"
SYNTHETIC_IN_USE_LOCK = ".synthetic.in-use.lock"


def _refused(error: OSError) -> bool:
    """The file system says no (permissions, a read-only mount), as opposed to a missing or broken path."""
    return isinstance(error, PermissionError) or error.errno == errno.EROFS


def _lock_descriptor(path: Path) -> int | None:
    """A descriptor to `flock` the lock file `path` by, or None when it is missing and cannot be created.

    Created writable by everyone (0o666, whatever the umask), so that another user sharing the folder can open it for
    writing too. Opened read-only where it cannot be opened for writing (another user's file, a read-only folder):
    flock does not care how the file was opened. filelock's FileLock opens for writing only, hence plain flock, which
    is what FileLock takes on Unix (so earlier versions of this code still exclude each other)."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        pass
    except OSError as error:
        if not _refused(error):
            raise
    else:
        with contextlib.suppress(OSError):  # the umask took the others' write bit; best effort
            os.fchmod(descriptor, 0o666)
        return descriptor
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError as error:
            if not _refused(error):
                raise
    return None  # not even readable: as good as missing


def _recorded_options(marker: Path) -> tuple[object, str | None]:
    """What `WRITTEN_MARKER` records (None when it is missing), and why it could not be read, if so. Only this module
    writes the file, atomically, so an unreadable one (a disk fault, a power cut, a stray edit) is not the user's to
    repair by hand, as `read_json`'s advice would have it: it counts as no record, and the set is written again."""
    if not marker.is_file():
        return None, None
    try:
        return read_json(marker, "synthetic set record"), None
    except (OSError, InvalidJSONError) as error:
        return None, str(error)


@contextlib.contextmanager
def synthetic_set(root: str | Path, options: dict, say: Callable[[str], None] = print, *, job: str = "run",
                  setting: str = "--synthetic_dir") -> Iterator[SyntheticCocoPaths]:
    """Makes `root` hold the synthetic set of `options` (`write_synthetic_coco`'s keyword arguments) and keeps it so
    while the context lasts; yields its paths. The set is written once per set of options (`WRITTEN_MARKER` records
    them), not again by every run that reads it.

    Runs that share the folder (train.py runs, the processes of one, studies; two terminals, two users) take turns to
    check and write it, so one never reads the set another is half-way through writing, nor do both write it: the
    second waits, saying so once through `say`, then reuses it. Each reader holds a shared lock until the context
    ends, so that a run with other options cannot rewrite the images under one that trains on them: it stops
    instead (`UserError`) naming the folder, this `job` ("study", "training run") and the `setting` that moves it.

    A read-only folder (or one where the lock files cannot be created) that already holds the set of `options` is
    used without locks, saying so; one that does not hold it stops with a `UserError` asking for a writable folder."""
    root = Path(root)
    # The defaults filled in, so that options given in full and the same options left to defaults share one set.
    options = {"num_train": DEFAULT_NUM_TRAIN, "num_val": DEFAULT_NUM_VAL, "image_size": DEFAULT_IMAGE_SIZE,
               "domain": DEFAULT_DOMAIN, **options}
    marker = root / WRITTEN_MARKER

    def cannot_write(error: OSError) -> UserError:
        return UserError(f"cannot write the synthetic set of this {job} ({options}) to {root} ({error}): set "
                         f"{setting} to a folder this user can write")

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if not _refused(error):
            raise
        raise cannot_write(error) from None
    writing = _lock_descriptor(root / SYNTHETIC_WRITE_LOCK)
    in_use = None
    try:
        in_use = None if writing is None else _lock_descriptor(root / SYNTHETIC_IN_USE_LOCK)
        if in_use is None:
            # Nothing to lock by, so nothing may be written; another run cannot write here either.
            recorded, problem = _recorded_options(marker)
            if recorded != options:
                found = f"it holds {recorded}" if recorded is not None else problem or f"{marker} is missing"
                raise cannot_write(PermissionError(f"its lock files cannot be created, and {found}"))
            say(f"using the synthetic set in {root} without locks: its lock files cannot be created there "
                "(a read-only folder?), and it holds the set of these options")
        else:
            try:
                fcntl.flock(writing, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another study or training run to finish writing the synthetic set in {root}")
                fcntl.flock(writing, fcntl.LOCK_EX)
            recorded, problem = _recorded_options(marker)
            if recorded != options:
                try:
                    fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(
                        f"{root} holds the synthetic set of another running study or training run "
                        f"({'unknown' if recorded is None else recorded}); writing this {job}'s ({options}) there "
                        f"would change the images under it: wait for that one to finish, or set {setting} to another "
                        "folder") from None
                if problem:
                    say(f"{marker} cannot be read ({problem}): writing the synthetic set again")
                try:
                    _write_marked(root, marker, options, say)
                except OSError as error:
                    if not _refused(error):
                        raise
                    raise cannot_write(error) from None
            # Cannot block: LOCK_EX is only taken under the write lock, which this holds (after a write: a downgrade).
            fcntl.flock(in_use, fcntl.LOCK_SH)
    except BaseException:
        if in_use is not None:
            os.close(in_use)
        raise
    finally:
        if writing is not None:
            os.close(writing)  # releases the write lock
    try:
        yield SyntheticCocoPaths.under(root)
    finally:
        if in_use is not None:
            os.close(in_use)


def _write_marked(root: Path, marker: Path, options: dict, say: Callable[[str], None]) -> None:
    """Writes the set of `options` to `root`, then `marker` naming them."""
    # A set killed half-way through must not pass for the one the marker names.
    marker.unlink(missing_ok=True)
    say(f"writing the synthetic {options['domain']!r} set ({options['num_train']} training and "
        f"{options['num_val']} validation images) to {root}")
    write_synthetic_coco(root, **options)
    # The marker is written durably (write_json_atomic fsyncs it), the images were not: after a power cut it could
    # name a set whose PNGs are empty. One sync puts them on disk first, far faster than an fsync per image file.
    os.sync()
    write_json_atomic(marker, options)
