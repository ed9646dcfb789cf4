"""Where images come from: expanding a glob, folder or tar shard into inputs, and reading their bytes."""
from __future__ import annotations

import re
import tarfile
from datetime import date, datetime, timezone
from typing import Iterator

import fsspec

from spade.io.images import IMAGE_SUFFIXES

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _protocol_prefix(spec: str) -> str:
    return spec.split("://", 1)[0] + "://" if "://" in spec else ""


def _with_protocol(prefix: str, path: str) -> str:
    return path if not prefix or path.startswith(prefix) else prefix + path


def is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_SUFFIXES)


def expand_images(spec: str, split: str | None = None) -> list[str]:
    """Sorted input URIs for ``--images``: a glob, a folder (every non-hidden file below it), or tar shards.

    A folder in MVTec layout (with train/ and test/) contributes only its
    ``split`` subfolder ('train' for fit, 'test' for score); ground_truth/ is never an input.
    Tar shards stay one URI each; their members are read by `read_inputs`.
    """
    fs, path = fsspec.core.url_to_fs(spec)
    prefix = _protocol_prefix(spec)
    if _GLOB_CHARS.search(path):
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        root = path.rstrip("/")
        if split and fs.isdir(f"{root}/train") and fs.isdir(f"{root}/test"):
            root = f"{root}/{split}"
        found = [p for p in fs.find(root) if "/ground_truth/" not in p[len(root):] + "/"]
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"--images {spec!r} matches nothing: no such file or folder, and no glob pattern matched")
    uris = sorted({_with_protocol(prefix, p) for p in found if not p.rsplit("/", 1)[-1].startswith(".")})
    if not uris:
        raise FileNotFoundError(f"--images {spec!r} matches no files")
    return uris


def read_inputs(uri: str, local: str | None = None) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(uri, bytes, error) per image behind ``uri``: one for a file, one per member for a tar shard (read from
    ``local``, a local copy of it, when given).

    Never raises for a bad input: a missing or unreadable file yields (uri, None, reason).
    """
    if is_tar(uri):
        yield from _read_tar(uri, local=local)
        return
    try:
        with fsspec.open(uri, "rb") as handle:
            yield uri, handle.read(), None
    except FileNotFoundError:
        yield uri, None, "file not found"
    except (OSError, ValueError) as exc:
        yield uri, None, f"cannot read file: {exc}"


def count_inputs(uri: str, local: str | None = None) -> int:
    """How many (uri, bytes, error) items `read_inputs` yields for ``uri``: 1 for a file; for a tar shard its
    members, read without their data (a unit of work knows when all its rows are in). Pass the same ``local`` copy
    as to `read_inputs`, so that a remote shard is downloaded once."""
    if not is_tar(uri):
        return 1
    return sum(1 for _ in _read_tar(uri, with_data=False, local=local))


def _read_tar(uri: str, with_data: bool = True, local: str | None = None) -> Iterator[tuple[str, bytes | None, str | None]]:
    try:
        opened = open(local, "rb") if local is not None else fsspec.open(uri, "rb")
        with opened as handle, tarfile.open(fileobj=handle, mode="r:*") as archive:
            for member in archive:
                if not member.isfile() or member.name.rsplit("/", 1)[-1].startswith("."):
                    continue
                member_uri = f"{uri}#{member.name}"
                if not member.name.lower().endswith(IMAGE_SUFFIXES):
                    yield member_uri, None, "not an image member (webdataset side file); skipped from scoring"
                    continue
                if not with_data:
                    yield member_uri, b"", None
                    continue
                extracted = archive.extractfile(member)
                yield member_uri, extracted.read() if extracted else b"", None
    except FileNotFoundError:
        yield uri, None, "tar shard not found"
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield uri, None, f"corrupt or truncated tar shard: {exc}"


_MVTEC = re.compile(r"/(?:train|test)/([^/#]+)/[^/]+$")


def label_from_uri(uri: str) -> str:
    """The MVTec class of an image ('good' or the defect type) from its path; '' when not in MVTec layout."""
    match = _MVTEC.search(uri.split("#", 1)[-1] if "#" in uri else uri)
    return match.group(1) if match else ""


def stem(uri: str) -> str:
    name = uri.rsplit("#", 1)[-1].rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def mask_uri(masks_root: str, label: str, image_uri: str) -> str:
    """MVTec ground-truth location of an image's defect mask."""
    return f"{masks_root.rstrip('/')}/{label}/{stem(image_uri)}_mask.png"


_DATE_IN_PATH = re.compile(r"(?:^|[/=_-])(\d{4}-\d{2}-\d{2})(?=$|[/_.-])")


def image_date(uri: str) -> date:
    """The day an input belongs to: a YYYY-MM-DD in its path (date-partitioned archives), else its
    modification time (UTC)."""
    path = uri.split("#", 1)[0]
    found = _DATE_IN_PATH.findall(path)
    if found:
        return date.fromisoformat(found[-1])
    fs, fs_path = fsspec.core.url_to_fs(path)
    info = fs.info(fs_path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    if isinstance(stamp, (int, float)):
        return datetime.fromtimestamp(stamp, tz=timezone.utc).date()
    if isinstance(stamp, str):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(timezone.utc).date()
    if isinstance(stamp, datetime):
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).date()
    raise ValueError(f"{uri}: cannot tell its date (no YYYY-MM-DD in the path, no modification time); drop --since")


def dated_on_or_after(uri: str, since: str) -> bool:
    """Whether input ``uri``'s `image_date` is ``since`` (YYYY-MM-DD) or later."""
    return image_date(uri) >= date.fromisoformat(since)


def modified_since(uris: list[str], since: str) -> list[str]:
    """The inputs whose `image_date` is ``since`` (YYYY-MM-DD) or later."""
    return [uri for uri in uris if dated_on_or_after(uri, since)]
