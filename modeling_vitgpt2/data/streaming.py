"""Caption data too large to read first: webdataset tar shards (the layout img2dataset writes: `KEY.jpg` with
`KEY.txt` and/or `KEY.json` per sample) and any `datasets` dataset opened with `streaming=True`.

Both go through `datasets`' own streaming engine (`IterableDataset`), nothing is read before training starts, and
both give rows with the columns `CaptionCollator` reads: `image` (a decoded RGB PIL image), `caption`, `image_name`.

Tar shards follow webdataset's conventions: the files of one sample are consecutive members whose names share a
key, and the key is the member's path up to the first dot of its file name (`dir.v2/cat.jpg` -> key `dir.v2/cat`,
field `jpg`; `v1.2.jpg` -> key `v1`, field `2.jpg`, which is not an image field). A sample's image is its field
with any of `IMAGE_EXTENSIONS`, so shards may mix `.jpg`, `.png`, `.webp` ... sample by sample; its caption is the
`.txt` field, else the `caption` of the `.json` field (field names in any case: `KEY.JPG` with `KEY.TXT`). A `.txt`
or `.json` over `MAX_TEXT_FIELD_BYTES`, or an image over `MAX_IMAGE_FIELD_BYTES`, is not read, and its sample is
skipped. A field stored as a hard or symbolic link (or as a device or FIFO) is not followed: its sample is skipped
with the link and its target named (see `_unread_field`).

A bad sample (no image, no or an empty caption, a caption that is not UTF-8 or holds NUL bytes, a `.json` that is
not a JSON object, an image that does not decode) is skipped, and so is a shard that is not a tar file or the rest
of a shard that is cut short: each is counted by reason and shard in a `StreamCounts` (one per process) and logged,
instead of stopping a run hours in. A shard is cut short where it ends inside a member or its header, where tarfile
fails on it (also with the errors that are no `TarError`, see `_from_tarfile`: a `.tar.gz` cut inside its gzip
header, a GNU sparse map cut short), and where its end-of-archive marker is followed by data (a zero hole where a
download did not write, or concatenated tars, see `_check_end`); zeros after the marker are record padding however
many, so a download zero-filled from a header on to its end goes unseen, unless the zeros start inside a caption,
which then holds NUL bytes. Of a shard cut
short, the samples before the cut are kept, but not the last one the reader holds (it yields a sample when a member
of the next key starts it): members of its key behind the cut could have changed it (a `.txt` after its `.json`, in
the sorted order webdataset's `TarWriter` writes, replaces the caption) or refused it (a link, an oversized member),
so it is dropped with the rest, unless a member read whole has already made it a bad sample (see `_field_problem`),
which is then counted by its own reason. No sample of a cut shard differs from the intact shard's (tested at every
cut offset near member boundaries).

Splitting across processes and nodes is `accelerate`'s job, which `Trainer` calls: with `dispatch_batches=False`
(set by `run_training` for streams) it gives each process `IterableDataset.shard(num_processes, process_index)`, whole
tar files per process, so each sample is read once per epoch by one process. (`datasets.distributed.
split_dataset_by_node` does the same when the shard count divides the world size, but `Trainer`'s accelerate would
then shard the result a second time and lose data; with an indivisible count it makes every process read every
shard.) Give at least as many shards as processes, ideally a multiple: with fewer, every process reads the whole
stream and keeps its share of the batches.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import datasets
import fsspec
from braceexpand import braceexpand
from PIL import Image
from transformers import TrainerCallback

from ..model.processing_vitgpt2 import IMAGE_EXTENSIONS, ImageTooLargeError, as_rgb_image
from .captions import CaptionDataError

__all__ = [
    "BadSample",
    "decode_sample",
    "decoded_rows",
    "EmptyStreamCheck",
    "expand_shards",
    "first_captions",
    "materialise",
    "MAX_IMAGE_FIELD_BYTES",
    "MAX_TEXT_FIELD_BYTES",
    "SHARD_CAPTION_FIELD",
    "SHARD_METADATA_FIELD",
    "SHARD_PROBLEM_KEY",
    "stream_hf_dataset",
    "stream_webdataset",
    "StreamCounts",
    "tar_samples",
]


logger = logging.getLogger(__name__)

SHARD_CAPTION_FIELD = "txt"
SHARD_METADATA_FIELD = "json"
# The `image_name` of the row standing for a whole shard, or the rest of one, that could not be read.
SHARD_PROBLEM_KEY = "__shard__"
# webdataset's `base_plus_ext`: the key is the path up to the first dot of the file name, the field what follows.
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_IMAGE_FIELDS = {extension.lstrip(".") for extension in IMAGE_EXTENSIONS}
# A caption or its metadata larger than this is not a caption: its sample is skipped without reading the member,
# so that one multi-gigabyte `.txt` cannot take the process's memory.
MAX_TEXT_FIELD_BYTES = 1 << 20
# The same guard for an image member, which is otherwise read whole before the decoder's pixel limit can look at its
# header. 256 MiB is the size of an uncompressed 8-bit RGB image at the default pixel limit (3 bytes x
# `DEFAULT_MAX_IMAGE_PIXELS` = 89,478,485 pixels, the figure Pillow derived that limit from, rounded up): a JPEG, PNG
# or WebP of any image the decoder accepts is far smaller, and even an uncompressed RGB BMP or TIFF at the limit fits.
# Only uncompressed 16-bit or alpha images near the limit are refused, and those are re-encoded at no loss for a model
# that sees a few hundred pixels a side. It does not follow VITGPT2_MAX_IMAGE_PIXELS: what it bounds is the bytes
# every process allocates for one member before anything looks at them.
MAX_IMAGE_FIELD_BYTES = 256 << 20
_TEXT_FIELDS = (SHARD_CAPTION_FIELD, SHARD_METADATA_FIELD)
# The columns of a tar stream's rows. A row's `problem` is why it is skipped (None for a good one), counted in
# `decoded_rows` rather than where it is read, so that it is counted in the process that would have trained it.
_TAR_ROW_FEATURES = datasets.Features({
    "image": datasets.Image(decode=False),
    "caption": datasets.Value("string"),
    "image_name": datasets.Value("string"),
    "shard": datasets.Value("string"),
    "problem": datasets.Value("string"),
})
_BOOKKEEPING_COLUMNS = ("shard", "problem")


@dataclass
class StreamCounts:
    """What one process's stream yielded and skipped (with `dataloader_num_workers=0` every row passes through the
    training process; with workers each worker keeps its own copy, so `run_training` reports no count then)."""

    used: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    by_shard: dict[str, Counter] = field(default_factory=dict)

    def skip(self, name: str, reason: str, shard: str | None = None) -> None:
        self.skipped += 1
        self.reasons[reason.split(":")[0]] += 1
        if shard is not None:
            self.by_shard.setdefault(shard, Counter())[reason.split(":")[0]] += 1
            logger.warning("Skipping sample %s: %s (shard %s)", name, reason, shard)
        else:
            logger.warning("Skipping sample %s: %s", name, reason)


class EmptyStreamCheck(TrainerCallback):
    """Stops a run whose training stream went through a whole pass without one usable sample (every shard
    unreadable or every sample bad): `Trainer` would otherwise end at step 0 with exit status 0."""

    def __init__(self, counts: StreamCounts, source: str):
        self.counts, self.source, self.start_step = counts, source, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step != self.start_step:
            return
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.counts.reasons.most_common()) or "none counted"
        named = sorted(self.counts.by_shard)
        shards = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "") or self.source
        raise CaptionDataError(
            f"the training stream {self.source} has no readable sample: a whole pass gave nothing to train on "
            f"(skipped: {reasons}; in {shards}). The log has a line per skipped sample; replace the shards or "
            "point --train_shards at readable ones."
        )


def expand_shards(pattern: str) -> list[str]:
    """The tar files a pattern names: braces as in webdataset (`data/{00000..00099}.tar`), globs, or a comma list."""
    files = []
    for part in filter(None, map(str.strip, pattern.split(","))):  # a trailing comma names no empty shard
        for name in braceexpand(part):
            if "://" in name:  # remote files are opened by fsspec; nothing to check here
                files.append(name)
            elif glob.has_magic(name) and not Path(name).is_file():  # `runs[v2]/000.tar` may be a file's own name
                files.extend(sorted(glob.glob(name)))
            else:
                files.append(name)
    if not files:
        raise CaptionDataError(f"--train_shards {pattern!r} names no file")
    missing = [name for name in files if "://" not in name and not Path(name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CaptionDataError(f"{len(missing)} of the {len(files)} shards of {pattern!r} are missing: {shown}")
    return files


@dataclass(frozen=True)
class _Unread:
    """A field whose member was not read, with the reason its sample is skipped."""

    problem: str


def _unread_field(member: tarfile.TarInfo, field_name: str) -> _Unread | None:
    """Why the member of an image or caption field is not to be read, if it is not.

    A link is not followed. A hard link names an earlier member of the shard, whose bytes a tar stream (`r|*`, read
    once, front to back, which remote shards need) has gone past; keeping every member's bytes in case a later one
    links to it would hold the whole shard in memory. A symbolic link may name any path, outside the shard too
    (`/etc/passwd`), and nothing in a shard is to make the reader open a file of this machine. webdataset's own
    reader drops link members without a word, so the fix is the same for both: shards holding the files' bytes."""
    if member.islnk() or member.issym():
        kind, repack = ("a hard link", "--hard-dereference") if member.islnk() else ("a symbolic link", "--dereference")
        return _Unread(f"link: {member.name} is {kind} to {member.linkname!r}, and links in a shard are not followed; "
                       f"re-pack the shard with the files' contents (GNU tar {repack}, or webdataset's TarWriter)")
    if not member.isfile():
        kind = ("a character device" if member.ischr() else "a block device" if member.isblk() else
                "a FIFO" if member.isfifo() else f"a member of tar type {member.type!r}")
        return _Unread(f"not a file: {member.name} is {kind}, not a regular file; re-pack the shard with the "
                       "files' contents")
    if field_name in _TEXT_FIELDS and member.size > MAX_TEXT_FIELD_BYTES:
        return _Unread(f"caption too large: {member.name} has {member.size:,} bytes, more than "
                       f"{MAX_TEXT_FIELD_BYTES:,}")
    if field_name in _IMAGE_FIELDS and member.size > MAX_IMAGE_FIELD_BYTES:
        return _Unread(f"image too large: {member.name} has {member.size:,} bytes, more than {MAX_IMAGE_FIELD_BYTES:,}"
                       " (an uncompressed RGB image at the default pixel limit); re-encode it (JPEG, PNG or WebP) "
                       "or leave it out")
    return None


def _nul_problem(caption: str) -> str | None:
    """Why a caption is not one where it holds NUL bytes: no caption does, but a shard zero-filled past the bytes a
    download wrote (aria2 and torrent clients preallocate the whole file) reads as members ending in zeros."""
    if "\x00" not in caption:
        return None
    shown = repr(caption[:40]) + ("..." if len(caption) > 40 else "")
    return (f"caption holds NUL bytes: {shown} (a shard cut short and zero-filled, as a download that stopped "
            "leaves it?); download the shard again")


def _field_problem(field_name: str, value: bytes | _Unread) -> str | None:
    """What makes one field of a sample unusable by itself (a member not read, a `.txt` that is no caption): no other
    member of the sample undoes it (a second `.txt` starts a sample of its own), so its sample is bad whatever
    follows. A `.json`'s problem is not one: a `.txt` after it replaces its caption."""
    if isinstance(value, _Unread):
        return value.problem
    if field_name == SHARD_CAPTION_FIELD:
        try:
            return _nul_problem(value.decode("utf-8"))
        except UnicodeDecodeError as error:
            return f"unreadable caption: not UTF-8 ({error})"
    return None


def _caption_row(shard: str, key: str, fields: dict[str, bytes | _Unread]) -> dict:
    """The row of one sample's fields: its image bytes and caption, or the problem that makes it unusable."""
    row = {"image": None, "caption": None, "image_name": key, "shard": shard, "problem": None}
    # The first field bad by itself, in member order, names the sample's problem: a shard cut after that member then
    # counts the sample under the reason the intact shard gives (see `_shard_samples`).
    problem = next(filter(None, (_field_problem(name, value) for name, value in fields.items())), None)
    if problem is not None:
        row["problem"] = problem
        return row
    image_field = next((name for name in fields if name in _IMAGE_FIELDS), None)
    if image_field is None:
        row["problem"] = (f"no image: the sample has the fields {sorted(fields)} and none is an image "
                          f"({', '.join(IMAGE_EXTENSIONS)}; the key ends at the first dot of the file name)")
        return row
    row["image"] = {"bytes": fields[image_field], "path": f"{key}.{image_field}"}
    if SHARD_CAPTION_FIELD in fields:  # UTF-8 without NUL bytes, as `_field_problem` found it
        row["caption"] = fields[SHARD_CAPTION_FIELD].decode("utf-8")
    elif SHARD_METADATA_FIELD in fields:
        try:
            metadata = json.loads(fields[SHARD_METADATA_FIELD].decode("utf-8"))
        except UnicodeDecodeError as error:
            row["problem"] = f"unreadable caption: not UTF-8 ({error})"
            return row
        except json.JSONDecodeError as error:
            row["problem"] = f"unreadable metadata: the .json is not valid JSON ({error})"
            return row
        if not isinstance(metadata, dict):
            row["problem"] = f"unreadable metadata: the .json holds a {type(metadata).__name__}, not an object"
            return row
        caption = metadata.get("caption")
        if isinstance(caption, str):
            row["caption"], row["problem"] = caption, _nul_problem(caption)
    if row["caption"] is None:
        row["problem"] = (f"no caption: neither a .{SHARD_CAPTION_FIELD} field nor a 'caption' string in a "
                          f".{SHARD_METADATA_FIELD} field (the sample has {sorted(fields)})")
    return row


def tar_samples(shards: list[str]) -> Iterator[dict]:
    """The rows of webdataset tar `shards`, one per sample in member order (see the module docstring for keys and
    fields), undecoded. A shard that cannot be opened, or the rest of one whose reading fails, gives one row with
    the key `SHARD_PROBLEM_KEY` and the reason; nothing raises. `datasets` calls this once per shard (its list
    argument is how it splits the stream over processes and resumes at a shard)."""
    for shard in shards:
        yield from _shard_samples(shard)


class _CheckedTarInfo(tarfile.TarInfo):
    """A member header that refuses to end the archive early. tarfile ends an archive without a word where a header
    past the first is missing, cut or damaged, as if the shard had ended there: a shard cut at a 512-byte boundary
    (where an interrupted copy or download often stops) or with one damaged header would lose the rest of its samples
    uncounted. Only the end-of-archive marker (a block of zeros, `EOFHeaderError`) ends a shard."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as error:
            if archive.offset == 0:  # no member at all: tarfile's own "not a tar file" error
                raise
            what = "missing (the file ends there)" if isinstance(error, tarfile.EmptyHeaderError) else \
                f"cut short or damaged ({error})"
            raise tarfile.ReadError(f"the member header at byte {archive.offset} is {what}") from None


# What tarfile's parsers raise, besides its own `TarError`s, on some shards cut short: a `.tar.gz` cut inside its
# gzip header (`TypeError` from `ord(b"")`), a GNU sparse map (PAX format) cut short (`ValueError`), a compressed
# stream ending inside a block (`EOFError`, `zlib.error`). Only calls into tarfile are wrapped (`_from_tarfile`), so
# that the same errors raised by this module's own code still surface as the bugs they are.
_TARFILE_PARSE_ERRORS = (TypeError, ValueError, EOFError, zlib.error)


def _from_tarfile(call, *args, **kwargs):
    """`call(*args, **kwargs)`, a call into tarfile, with what its parsers raise on a cut or damaged shard as the
    `tarfile.ReadError` that counts the shard as cut short."""
    try:
        return call(*args, **kwargs)
    except _TARFILE_PARSE_ERRORS as error:
        raise tarfile.ReadError(f"tarfile fails on it: {type(error).__name__}: {error}") from error


def _read_field(archive: tarfile.TarFile, member: tarfile.TarInfo, field_name: str) -> bytes | _Unread:
    """A member's value as a field: the bytes of an image or caption field, why it is not read (see
    `_unread_field`), or `b""` for a field this reader does not use, whose bytes are never held in memory (in stream
    mode tarfile reads past them in small blocks before the next header). Raises where the shard ends inside the
    bytes of an image or caption member; one cut inside another member raises when tarfile reads the next header."""
    if field_name in _IMAGE_FIELDS or field_name in _TEXT_FIELDS:
        return _unread_field(member, field_name) or _from_tarfile(lambda: archive.extractfile(member).read())
    return b""


# Tar writers pad an archive after its end-of-archive marker (the zero block where tarfile stops) with zeros up to a
# whole record, of any size (`tar -b`: up to hundreds of MiB); so zeros there, however many, are a whole shard, and
# only data counts as more of the shard. Past this many bytes the reader stops looking.
_END_READ_LIMIT = 64 << 20


def _check_end(archive: tarfile.TarFile) -> None:
    """Raises `tarfile.ReadError` where data follows the end-of-archive marker tarfile stopped at: a download that
    preallocated the whole file and wrote it out of order (torrent clients) leaves a zero hole, which tarfile takes
    for the marker where it starts at a header, ending the shard without a word; or tar files were concatenated,
    whose second part tar readers do not read. Zeros up to the end (record padding) are a whole shard, and so is
    the end of a compressed stream: bzip2 and xz refuse to read past it, and what follows it (padding to a record,
    as bsdtar writes) is not part of the archive. Reads at most `_END_READ_LIMIT` bytes past the marker."""
    end, after = archive.offset, 0
    while after < _END_READ_LIMIT:
        try:
            chunk = archive.fileobj.read(min(1 << 16, _END_READ_LIMIT - after))
        except EOFError:
            if getattr(getattr(archive.fileobj, "cmp", None), "eof", False):
                return
            raise tarfile.ReadError("the compressed stream ends inside its padding") from None
        if not chunk:
            return
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(
                f"the end-of-archive marker at byte {end} is followed by data, which tar readers do not read (a shard "
                "zero-filled where a download did not write it, or tar files concatenated); download or write the "
                "shard again")
        after += len(chunk)


def _shard_samples(shard: str) -> Iterator[dict]:
    key, fields, samples = None, {}, 0
    try:
        with fsspec.open(shard, "rb") as file, \
                _from_tarfile(tarfile.open, fileobj=file, mode="r|*", tarinfo=_CheckedTarInfo) as archive:
            members = iter(archive)
            while (member := _from_tarfile(next, members, None)) is not None:
                # Any member but a folder is a field, links included: a sample whose image is a link is then
                # skipped as such, not as "no image" (see `_unread_field`).
                match = None if member.isdir() else _KEY_AND_FIELD.match(member.name)
                if match is None:
                    continue
                member_key, field_name = match.groups()
                # Field names are compared case-insensitively (`KEY.JPG` with `KEY.TXT`).
                field_name = field_name.lower()
                if key is not None and (member_key != key or field_name in fields):
                    samples += 1
                    yield _caption_row(shard, key, fields)
                    fields = {}
                key = member_key
                fields[field_name] = _read_field(archive, member, field_name)
            _check_end(archive)
    except (tarfile.TarError, OSError, EOFError) as error:
        # The sample the reader holds (yielded when a member of the next key starts it) may have had members behind
        # the cut, which would have changed it (a `.txt` after its `.json`) or refused it (a link, an oversized
        # member): it is dropped with the rest, unless one of its members, read whole, has already made it a bad
        # sample, which is then counted as the intact shard counts it.
        if key is not None and any(_field_problem(name, value) for name, value in fields.items()):
            samples += 1
            yield _caption_row(shard, key, fields)
        where = "the shard cannot be read as a tar file" if samples == 0 and key is None else \
            f"the shard is cut short after {samples} sample(s); the rest of it is skipped"
        yield {"image": None, "caption": None, "image_name": SHARD_PROBLEM_KEY, "shard": shard,
               "problem": f"unreadable shard: {where} ({type(error).__name__}: {error})"}
        return
    if key is not None:
        yield _caption_row(shard, key, fields)


def stream_webdataset(shards: str | list[str]) -> datasets.IterableDataset:
    """Caption rows streamed from webdataset tar shards, one per sample, in shard order, images undecoded, with the
    bookkeeping columns `shard` and `problem` (see `decoded_rows`)."""
    files = expand_shards(shards) if isinstance(shards, str) else list(shards)
    # One sample in, one row out: a resumed stream (`IterableDataset.load_state_dict`) restarts at the next sample.
    return datasets.IterableDataset.from_generator(tar_samples, features=_TAR_ROW_FEATURES,
                                                   gen_kwargs={"shards": files})


def stream_hf_dataset(
    name: str, split: str, image_column: str = "image", caption_column: str = "caption",
    config_name: str | None = None,
) -> datasets.IterableDataset:
    """Caption rows streamed from any `datasets` dataset (`load_dataset(..., streaming=True)`); a caption cell may
    hold one caption or a list, which gives one row per caption (see `decoded_rows`)."""
    stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
    columns = stream.column_names
    if columns is not None:
        absent = [column for column in (image_column, caption_column) if column not in columns]
        if absent:
            raise CaptionDataError(
                f"{name} (split {split!r}) has no column {', '.join(map(repr, absent))}; its columns are {columns}. "
                "Pass the right names as --image_column/--caption_column."
            )
    if stream.features is not None and isinstance(stream.features.get(image_column), datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))

    def caption_rows(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = {"image": [], "caption": [], "image_name": []}
        for image, captions, index in zip(batch[image_column], batch[caption_column], indices):
            path = image.get("path") if isinstance(image, dict) else None
            for caption in captions if isinstance(captions, (list, tuple)) and captions else [captions]:
                rows["image"].append(image)
                rows["caption"].append(caption)
                rows["image_name"].append(Path(path).stem if path else str(index))  # the row number, in this process
        return rows

    # Batched, to give a row per caption, but one source row per batch: a resumed stream reads again only the row
    # whose captions it was part-way through (a batch of 1000 would read up to 999 rows again).
    return stream.map(caption_rows, batched=True, batch_size=1, with_indices=True, remove_columns=columns)


class BadSample(ValueError):
    """A streamed sample to skip; the message is the reason counted (`StreamCounts.skip`)."""


def decode_sample(image, caption, name) -> Image.Image:
    """The RGB image of one streamed sample, or `BadSample` when its caption is missing or its image does not decode
    (the one check of a sample, shared by the image stream and the feature cache's pre-pass)."""
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample(f"no caption: {caption!r}")
    try:
        return as_rgb_image(image, name=str(name))
    except ImageTooLargeError as error:  # refused from its header, undecoded: the limit says how to raise it
        raise BadSample(f"image too large: {error}") from None
    except Exception as error:  # a decoder may raise anything on garbage bytes; count it rather than crash
        raise BadSample(f"unreadable image: {type(error).__name__}: {error}") from None


def decoded_rows(stream: datasets.IterableDataset, counts: StreamCounts,
                 keep_shard: bool = False) -> datasets.IterableDataset:
    """`stream` with each image decoded to RGB and each caption stripped; samples that fail are skipped and counted
    (by reason, and by shard for tar shards). Shuffle `stream` before this, not after: a shuffle buffer then holds
    encoded samples, not decoded full-size images. `keep_shard` keeps a tar stream's `shard` column."""

    def decode(row: dict) -> dict:
        try:
            if row.get("problem"):
                raise BadSample(row["problem"])
            image = decode_sample(row["image"], row["caption"], row["image_name"])
        except BadSample as problem:
            counts.skip(row["image_name"], str(problem), row.get("shard"))
            return {"image": None}
        counts.used += 1
        return {"image": image, "caption": row["caption"].strip()}

    columns = set(stream.column_names or ())
    dropped = [name for name in _BOOKKEEPING_COLUMNS if name in columns and not (keep_shard and name == "shard")]
    # A map and a filter, one row at a time rather than a batched map that drops rows: a resumed stream then decodes
    # no image before its position (a batched map decodes its whole batch again and discards what it had yielded).
    return stream.map(decode, features=None, remove_columns=dropped or None).filter(
        lambda row: row["image"] is not None)


def first_captions(stream: datasets.IterableDataset, limit: int) -> list[str]:
    """Captions of the first `limit` rows (to train a tokenizer for a model built from scratch), images untouched."""
    return [row["caption"] for row in islice(stream, limit) if isinstance(row["caption"], str) and row["caption"].strip()]


def materialise(stream: datasets.IterableDataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` rows of a decoded stream as an in-memory `Dataset` (for a validation set). Rows of tar
    shards (with a `shard` column, see `decoded_rows(keep_shard=True)`) must have distinct keys: predictions are
    scored per key, so two samples with one key (the same shard given twice, a key repeated inside one) would be
    merged and the metric computed on fewer images without a word."""
    rows = list(islice(stream, limit))
    if not rows:
        raise CaptionDataError("the validation stream yielded no usable sample")
    if "shard" in rows[0]:
        first_shard = {}
        for row in rows:
            shard = row.pop("shard")
            if row["image_name"] in first_shard:
                raise CaptionDataError(
                    f"two validation samples have the key {row['image_name']!r}: in {first_shard[row['image_name']]} "
                    f"and in {shard}; predictions are scored per key, so they would be merged. Give each shard once "
                    "and each sample its own key."
                )
            first_shard[row["image_name"]] = shard
    return datasets.Dataset.from_list(
        [{**row, "image_id": row["image_name"]} for row in rows],
        features=datasets.Features({
            "image": datasets.Image(), "caption": datasets.Value("string"), "image_name": datasets.Value("string"),
            "image_id": datasets.Value("string"),
        }),
    )
