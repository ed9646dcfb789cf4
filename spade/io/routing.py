"""Routing an archive's inputs to galleries by the partitions of their paths (``line=L3/camera=top/...``).

A plant's archive is laid out by line and camera, each with its own normal appearance and gallery. A routing
rule names the gallery of a partition:

* a template, ``--gallery 's3://plant/galleries/{line}-{camera}'``: the fields come from ``key=value`` folders
  below the ``--images`` root, in any order and at any depth above the images (other ``key=value`` folders,
  e.g. ``site=A``, are passed through); a folder that is not ``key=value`` before every field is bound is
  not routed;
* a routes table, ``--gallery routes.yaml``::

      routes:
        - match: line=L3/camera=*        # folders below the --images root, one glob per level
          gallery: s3://plant/galleries/l3-{camera}
        - match: line=*/camera=*
          gallery: s3://plant/galleries/{line}-{camera}

  the first rule whose levels all match wins; ``{field}`` in a gallery takes the value of a ``field=value``
  folder the rule matched.

`plan_routes` walks the folders only down to where the routes are decided: its cost grows with the number of
partitions (lines x cameras), never with the images or nights below them. Each route gets the ``--images``
spec narrowed to its folder, so workers list it as they list any spec; what no rule matches comes back as
specs of its own (`RoutePlan.unrouted`), whose inputs the pipelines turn into error rows, never a silent drop.
"""
from __future__ import annotations

import fnmatch
import string
from dataclasses import dataclass, field

import fsspec
import yaml

from spade.io.sources import _GLOB_CHARS, _protocol_prefix, _with_protocol

TABLE_SUFFIXES = (".yaml", ".yml")
MAX_DEPTH = 8  # folder levels walked below the --images root before a subtree is declared unrouted
SKIPPED = ("ground_truth",)


class RoutingError(ValueError):
    """A routing rule that cannot be applied (a gallery field no folder gives, a malformed table)."""


@dataclass(frozen=True)
class Route:
    """One partition's inputs and the gallery they are scored against (or fitted into).

    name: the partition's folders below the ``--images`` root (``line=L3/camera=top``), which is also where
    its outputs go below ``--out``; images: the ``--images`` spec narrowed to that folder."""

    name: str
    images: str
    gallery: str


@dataclass(frozen=True)
class RoutePlan:
    """The routes, in name order, and the specs of inputs that no rule routes."""

    routes: list[Route]
    unrouted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Rule:
    match: tuple[str, ...] | None  # None: a template (bind its fields from key=value folders)
    gallery: str


def is_routing(gallery: str) -> bool:
    """Whether ``--gallery`` is a routing rule (a template with ``{fields}`` or a routes table) rather than one gallery."""
    return "{" in gallery or gallery.lower().endswith(TABLE_SUFFIXES)


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a gallery template, in order."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise RoutingError(f"gallery template {template!r}: {exc}") from None


def _partition_fields(segments: tuple[str, ...]) -> dict[str, str]:
    return dict(segment.split("=", 1) for segment in segments if "=" in segment)


def _fill(template: str, segments: tuple[str, ...], where: str) -> str:
    fields = _partition_fields(segments)
    missing = [name for name in template_fields(template) if name not in fields]
    if missing:
        raise RoutingError(f"{where}: the gallery {template!r} needs {', '.join(missing)}, which no "
                           f"`{missing[0]}=...` folder of {'/'.join(segments) or 'the --images root'} gives")
    return template.format(**fields)


def load_rules(gallery: str) -> list[_Rule]:
    """The rules of ``--gallery``: one template rule, or a routes table's rules in order."""
    if not gallery.lower().endswith(TABLE_SUFFIXES):
        template_fields(gallery)
        return [_Rule(None, gallery)]
    with fsspec.open(gallery, "r") as handle:
        loaded = yaml.safe_load(handle) or {}
    routes = loaded.get("routes") if isinstance(loaded, dict) else None
    if not isinstance(routes, list) or not routes:
        raise RoutingError(f"{gallery}: a routes table is a YAML mapping with `routes:`, a list of "
                           "{match: line=L3/camera=*, gallery: <url with {fields}>}")
    rules = []
    for i, rule in enumerate(routes):
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str) or not isinstance(rule.get("gallery"), str):
            raise RoutingError(f"{gallery}: route {i + 1} needs `match:` (folders below --images, e.g. line=L3/camera=*) "
                               "and `gallery:`")
        match = tuple(part for part in rule["match"].strip("/").split("/") if part)
        if not match:
            raise RoutingError(f"{gallery}: route {i + 1}: `match:` is empty")
        template_fields(rule["gallery"])
        rules.append(_Rule(match, rule["gallery"]))
    return rules


def _decide(rules: list[_Rule], segments: tuple[str, ...]) -> tuple[str, _Rule | None]:
    """("route", rule), ("descend", None) or ("unrouted", None) for the folder ``segments`` below the root."""
    deeper = False
    for rule in rules:
        if rule.match is None:
            if any("=" not in segment for segment in segments):
                continue
            if all(name in _partition_fields(segments) for name in template_fields(rule.gallery)):
                return "route", rule
            deeper = deeper or len(segments) < MAX_DEPTH
            continue
        if len(segments) <= len(rule.match) and all(
                fnmatch.fnmatchcase(segment, pattern) for segment, pattern in zip(segments, rule.match)):
            if len(segments) == len(rule.match):
                return "route", rule
            deeper = True
    return ("descend" if deeper else "unrouted"), None


def _narrow(pattern: list[str] | None, segments: tuple[str, ...]) -> list[str] | None:
    """What is left of the spec's glob components below the folder ``segments`` ([] : the folder's own files or
    the folder itself; None: the glob reaches nothing there). ``pattern`` None: a folder spec (everything below)."""
    if pattern is None:
        return None if any(segment in SKIPPED for segment in segments) else []
    rest = list(pattern)
    for segment in segments:
        if not rest:
            return None
        if rest[0] == "**":
            return rest
        if not fnmatch.fnmatchcase(segment, rest[0]):
            return None
        rest = rest[1:]
    return rest


def _file_matches(rest: list[str] | None, name: str) -> bool:
    if rest is None:
        return False
    if not rest:  # a folder spec: every file below
        return True
    if rest[0] == "**":
        rest = rest[1:] or ["*"]
    return len(rest) == 1 and fnmatch.fnmatchcase(name, rest[0])


def plan_routes(images: str, gallery: str) -> RoutePlan:
    """The routes of ``images`` under the rule(s) of ``gallery`` (see the module's docstring); raises
    `RoutingError` for a rule that cannot be applied and FileNotFoundError when the images root does not exist."""
    rules = load_rules(gallery)
    fs, path = fsspec.core.url_to_fs(images)
    prefix = _protocol_prefix(images)
    full = lambda p: _with_protocol(prefix, p)  # noqa: E731
    if _GLOB_CHARS.search(path):
        parts = path.split("/")
        first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
        root, pattern = "/".join(parts[:first]), parts[first:]
    else:
        root, pattern = path.rstrip("/"), None
    if not fs.isdir(root):
        raise FileNotFoundError(f"--images {images!r}: routing needs a folder (or a glob below one) to walk; "
                                f"{full(root)} is not a folder")

    def spec_below(segments: tuple[str, ...], rest: list[str]) -> str:
        folder = "/".join((root, *segments))
        return full(f"{folder}/{'/'.join(rest)}" if rest else folder)

    routes: list[Route] = []
    unrouted: list[str] = []
    pending: list[tuple[str, ...]] = [()]
    while pending:
        segments = pending.pop()
        rest = _narrow(pattern, segments)
        if rest is None:
            continue
        decision, rule = _decide(rules, segments)
        if decision == "route":
            where = f"--gallery {gallery}" if rule.match is None else f"{gallery} (match: {'/'.join(rule.match)})"
            routes.append(Route("/".join(segments), spec_below(segments, rest), _fill(rule.gallery, segments, where)))
            continue
        if decision == "unrouted":
            if segments:
                unrouted.append(spec_below(segments, rest))
            continue
        folder = "/".join((root, *segments))
        for child in sorted(fs.ls(folder, detail=True), key=lambda c: c["name"]):
            name = child["name"].rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or name.startswith("_"):
                continue
            if child["type"] == "directory":
                pending.append((*segments, name))
            elif _file_matches(rest, name):
                unrouted.append(full(child["name"]))
    return RoutePlan(sorted(routes, key=lambda route: route.name), sorted(unrouted))
