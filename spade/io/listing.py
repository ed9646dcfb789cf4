"""Expanding ``--images`` in parts that separate workers can list: one part per folder below its root, split further
on workers where the archive is partitioned deeper (`split_part`).

`expand_images` lists everything in one process; for an archive of millions of files that process
would be the launcher, and the list would travel inside the job graph. Here the launcher keeps the
spec only: `plan_listing` (one directory listing) splits it into `ListingPart`s, one per
sub-folder of the spec's root, and `list_part` lists one part. The parts are disjoint and together
list exactly what `expand_images` lists (same filters: hidden names, MVTec ``ground_truth/``, the
``train``/``test`` split of an MVTec category folder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import fsspec

from spade.config import SpadeConfig
from spade.io.images import DecodeLimits, ImageDecodeError, brightness_for, decode_rgb, frame_brightness, header_size
from spade.io.sources import _GLOB_CHARS, _protocol_prefix, _with_protocol, is_tar, read_inputs


@dataclass(frozen=True)
class ListingPart:
    """What one worker lists.

    kind: ``file`` (``path`` itself), ``files`` (the files directly in folder ``path``), ``find``
    (every file below folder ``path``, leaving out ``ground_truth/`` below ``root``) or ``glob``
    (the files matching pattern ``path``). Paths carry the spec's protocol.
    """

    kind: str
    path: str
    root: str = ""


class InputsMissing(FileNotFoundError):
    """``--images`` names nothing that exists."""


def _nothing(spec: str) -> InputsMissing:
    return InputsMissing(f"--images {spec!r} matches nothing: no such file or folder, and no glob pattern matched")


def check_spec(spec: str) -> None:
    """A cheap launcher-side check (one or two metadata calls, whatever the archive size) that ``spec`` can match
    something: the file or folder exists, or, for a glob, the folder before its first wildcard does."""
    fs, path = fsspec.core.url_to_fs(spec)
    if _GLOB_CHARS.search(path):
        literal = _literal_prefix(path)[0]
        if literal and not fs.isdir(literal):
            raise _nothing(spec)
    elif not fs.exists(path):
        raise _nothing(spec)


def names_one_image(spec: str) -> bool:
    """Whether ``spec`` names one image file (no wildcard, not a folder, not a tar shard): one metadata call."""
    fs, path = fsspec.core.url_to_fs(spec)
    return not _GLOB_CHARS.search(path) and not is_tar(path) and fs.isfile(path)


def _literal_prefix(path: str) -> tuple[str, list[str]]:
    """A glob pattern split into the folder before its first wildcard component and the components from there on."""
    parts = path.split("/")
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
    return "/".join(parts[:first]), parts[first:]


def plan_listing(spec: str, split: str | None = None) -> list[ListingPart]:
    """The parts that list ``spec`` (see `spade.io.sources.expand_images` for what a spec is); one listing of the
    spec's root folder, so it costs the same whatever lies below. Raises `InputsMissing` when nothing exists."""
    fs, path = fsspec.core.url_to_fs(spec)
    prefix = _protocol_prefix(spec)
    full = lambda p: _with_protocol(prefix, p)  # noqa: E731
    if _GLOB_CHARS.search(path):
        return [ListingPart("glob", full(p)) for p in _glob_parts(fs, path)]
    if fs.isdir(path):
        root = path.rstrip("/")
        if split and fs.isdir(f"{root}/train") and fs.isdir(f"{root}/test"):
            root = f"{root}/{split}"
        children = fs.ls(root, detail=True)
        parts = [ListingPart("files", full(root), full(root))]
        parts += [ListingPart("find", full(c["name"].rstrip("/")), full(root)) for c in children
                  if c["type"] == "directory" and c["name"].rstrip("/").rsplit("/", 1)[-1] != "ground_truth"]
        return parts
    if fs.exists(path):
        return [ListingPart("file", full(path))]
    raise _nothing(spec)


def split_part(part: ListingPart) -> list[ListingPart]:
    """A ``find`` part one level down, as parts of their own: the files directly in its folder and a ``find`` part per
    sub-folder (``ground_truth/`` left out); other parts, and a folder without sub-folders, as they are. One
    directory listing. Applied a few times on workers (`transforms.inputs.ListInputs`), it cuts an archive laid out
    ``line=/camera=/date=/hour=`` into parts of one leaf folder each, whatever its depth; the parts stay disjoint and
    together list what ``part`` lists."""
    if part.kind != "find":
        return [part]
    fs, path = fsspec.core.url_to_fs(part.path)
    prefix = _protocol_prefix(part.path)
    try:
        children = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    folders = [c["name"].rstrip("/") for c in children if c["type"] == "directory"]
    folders = [f for f in folders if f.rsplit("/", 1)[-1] != "ground_truth"]
    if not folders:
        return [part]
    parts = [ListingPart("files", part.path, part.root)] if any(c["type"] == "file" for c in children) else []
    return parts + [ListingPart("find", _with_protocol(prefix, f), part.root) for f in sorted(folders)]


def _glob_parts(fs, path: str) -> list[str]:
    """Patterns, one per sub-folder of the literal prefix where the first wildcard component allows it, whose
    matches together are ``fs.glob(path)``'s."""
    literal, rest = _literal_prefix(path)
    if len(rest) == 1 or not literal or not fs.isdir(literal):
        return [path]
    first, tail = rest[0], "/".join(rest[1:])
    folders = sorted(c["name"].rstrip("/") for c in fs.ls(literal, detail=True) if c["type"] == "directory")
    if first == "**":
        # `**` matches zero folders (the literal folder itself) or any folder below one of its children
        return [f"{literal}/{tail}"] + [f"{folder}/**/{tail}" for folder in folders]
    import fnmatch

    return [f"{folder}/{tail}" for folder in folders if fnmatch.fnmatchcase(folder.rsplit("/", 1)[-1], first)]


def list_part(part: ListingPart) -> list[str]:
    """The sorted input URIs of one part (hidden names left out, as `expand_images` does)."""
    fs, path = fsspec.core.url_to_fs(part.path)
    prefix = _protocol_prefix(part.path)
    if part.kind == "file":
        found = [path]
    elif part.kind == "files":
        found = [c["name"] for c in fs.ls(path, detail=True) if c["type"] == "file"]
    elif part.kind == "find":
        root = fsspec.core.url_to_fs(part.root)[1].rstrip("/")
        found = [p for p in fs.find(path) if "/ground_truth/" not in p[len(root):] + "/"]
    elif part.kind == "glob":
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    else:
        raise ValueError(f"unknown listing part kind {part.kind!r}")
    return sorted({_with_protocol(prefix, p) for p in found if not p.rsplit("/", 1)[-1].startswith(".")})


def _first_uris(part: ListingPart) -> Iterator[str]:
    """A part's input URIs, lazily where the filesystem allows (a folder is walked, not listed whole)."""
    if part.kind != "find":
        yield from list_part(part)
        return
    fs, path = fsspec.core.url_to_fs(part.path)
    prefix = _protocol_prefix(part.path)
    for folder, dirs, files in fs.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "ground_truth")
        for name in sorted(files):
            if not name.startswith("."):
                yield _with_protocol(prefix, f"{folder.rstrip('/')}/{name}")


Measured = TypeVar("Measured")


SAMPLE_READS = 4  # `sample_inputs` reads at most this many inputs per value it is asked for
SIZE_SAMPLE, BRIGHTNESS_SAMPLE = 64, 16  # images `spade fit` fixes the frame size and the brightness from


def sample_inputs(spec: str, split: str | None, limit: int,
                  measure: Callable[[bytes], Measured | None]) -> list[Measured]:
    """``measure`` of up to ``limit`` of the spec's inputs, taken part by part in listing order: what `spade fit`
    fixes a gallery's settings from. Inputs that cannot be read, or that ``measure`` gives None for, are passed over,
    but at most ``SAMPLE_READS`` x ``limit`` inputs are read: the cost is bounded whatever the archive's size, even
    one of unreadable files."""
    found: list[Measured] = []
    reads = 0
    for part in plan_listing(spec, split):
        for uri in _first_uris(part):
            for _, data, problem in read_inputs(uri):
                reads += 1
                if problem is None and data:
                    value = measure(data)
                    if value is not None:
                        found.append(value)
                if len(found) >= limit or reads >= SAMPLE_READS * limit:
                    return found
    return found


def sample_image_sizes(spec: str, split: str | None = None, limit: int = SIZE_SAMPLE) -> list[tuple[int, int]]:
    """(width, height) of up to ``limit`` of the spec's images, upright, from their headers (no pixels decoded): what
    `spade fit` fixes an ``aspect`` or ``tiles`` frame size from."""
    return sample_inputs(spec, split, limit, header_size)


def sample_image_brightness(spec: str, split: str | None = None, limit: int = BRIGHTNESS_SAMPLE,
                            limits: DecodeLimits | None = None) -> list[float]:
    """`frame_brightness` of up to ``limit`` of the spec's images, decoded within ``limits``: what `spade fit` fixes
    ``brightness: auto`` from (`spade.io.images.brightness_for`)."""
    def brightness(data: bytes) -> float | None:
        try:
            return frame_brightness(decode_rgb(data, limits))
        except ImageDecodeError:
            return None
    return sample_inputs(spec, split, limit, brightness)


def fix_brightness(config: SpadeConfig, spec: str, split: str | None = "train") -> tuple[SpadeConfig, list[float]]:
    """``config`` with ``brightness: auto`` fixed from a sample of the spec's images (`brightness_for`), and the levels
    it was fixed from; a config that sets it is returned as it is, with none. Raises `FileNotFoundError` when no
    image can be read."""
    if config.brightness != "auto":
        return config, []
    limits = DecodeLimits(config.max_source_pixels, config.max_aspect_ratio)
    levels = sample_image_brightness(spec, split, limits=limits)
    if not levels:
        read = SAMPLE_READS * BRIGHTNESS_SAMPLE
        raise FileNotFoundError(f"--images {spec!r}: no readable image among the first {read} inputs to fix the "
                                "brightness from; remove the unreadable files or set `brightness: keep`")
    return config.replace(brightness=brightness_for(levels)), levels
