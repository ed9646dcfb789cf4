"""`spade trend`: every night's score tables under a nightly root → a table per gallery and night, a machine-readable
verdict, and a static page with the time series, drift warnings and the last night's flagged images.

It reads the small per-night tables (three columns; the last night's also its flagged rows' URIs and map URIs) and
each gallery's run.json, never the maps, one route at a time: memory grows with one route's nights, not with the
archive. See `spade.evaluation.trend` for the statistics and the warning rule.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spade.evaluation.trend import QUANTILES, DriftRule, Night, Reference, assess
from spade.evaluation.trend_page import Series, render
from spade.io import storage
from spade.io.results import RUN_INFO, NightPartition, night_partitions, read_night_table

LOG = logging.getLogger("spade")
TABLE, VERDICT, PAGE = "trend.parquet", "trend.json", "index.html"
READERS = {"local": 2, "remote": 16}  # night tables read side by side: object stores answer in tens of milliseconds
# each; on a local disk more threads only contend for the interpreter
FLAGGED_SHOWN = 50
TREND_SCHEMA = pa.schema([
    ("route", pa.string()), ("gallery_hash", pa.string()), ("day", pa.string()), ("images", pa.int64()),
    ("ok", pa.int64()), ("errors", pa.int64()), ("flagged", pa.int64()), ("flagged_share", pa.float64()),
    ("mean", pa.float64()), *[(f"p{round(q * 100):02d}", pa.float64()) for q in QUANTILES],
    ("above_normal_2sd", pa.float64()), ("share_above_median", pa.float64()), ("ks_recent", pa.float64()),
    ("p_recent", pa.float64()), ("ks_baseline", pa.float64()), ("p_baseline", pa.float64()),
    ("warnings", pa.list_(pa.string())),
])


def gallery_reference(partitions: list[NightPartition]) -> tuple[Reference | None, str | None]:
    """(the normal reference, why there is none) of the gallery some nights were scored with, from the run.json of
    the latest of them that has one (a night with nothing new publishes none) or, for runs before run.json recorded
    it, the gallery's manifest."""
    found = next((url for url in (storage.join(p.folder, RUN_INFO) for p in reversed(partitions)) if storage.exists(url)),
                 None)
    if found is None:
        return None, f"no {RUN_INFO} in the nights of gallery {partitions[-1].gallery_hash}"
    info = storage.read_json(found)
    threshold = (info.get("thresholds") or {}).get("image")
    normal = info.get("normal")
    if normal is None:
        from spade.index.gallery import read_manifest  # only for runs before run.json recorded the reference
        from spade.scoring.calibration import normal_reference

        try:
            mode = (info.get("thresholds") or {}).get("image_score") or info["config"]["image_score"]
            normal = normal_reference(read_manifest(info["gallery"]), mode)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            return None, f"no calibrated normal scores for gallery {partitions[-1].gallery_hash} ({exc})"
    reference = Reference.from_record(normal, threshold)
    return reference, None if reference else f"gallery {partitions[-1].gallery_hash} records no normal score distribution"


def _night(partition: NightPartition) -> Night:
    table = read_night_table(partition.folder, ["image_score", "is_anomalous", "status"])
    if table is None:
        return _placeholder(partition)
    ok = table.column("status").to_numpy(zero_copy_only=False) == "ok"
    scores = table.column("image_score").to_numpy(zero_copy_only=False).astype(np.float64)[ok]
    flags = table.column("is_anomalous").to_numpy(zero_copy_only=False)[ok]  # bool, or object with None
    flagged = None if all(f is None for f in flags) else np.asarray([bool(f) for f in flags], dtype=bool)
    return Night(partition.day, partition.gallery_hash, scores, flagged, table.num_rows - scores.size)


def _flagged_rows(partition: NightPartition) -> list[dict[str, Any]]:
    table = read_night_table(partition.folder, ["uri", "image_score", "is_anomalous", "map_uri", "status"])
    if table is None:
        return []
    rows = [r for r in table.to_pylist() if r["status"] == "ok" and r["is_anomalous"]]
    return sorted(rows, key=lambda r: -r["image_score"])[:FLAGGED_SHOWN]


RECHECK = 2  # a route's last nights are always read again: a night re-run or resumed the next morning changes them


class CachedTrend:
    """The rows of the previous `spade trend` into the same --out (its trend.parquet), reused when computed with the
    same settings: a nightly trend reads the new nights' tables, not years of them again."""

    def __init__(self, table: pa.Table | None):
        self.table = table
        self.groups: dict[str, tuple[int, int]] = {}
        if table is not None and table.num_rows:
            routes = table.column("route").to_numpy(zero_copy_only=False)
            starts = np.flatnonzero(np.r_[True, routes[1:] != routes[:-1]])
            ends = np.r_[starts[1:], routes.size]
            self.groups = {str(routes[a]): (int(a), int(b)) for a, b in zip(starts, ends)}

    @classmethod
    def read(cls, out_url: str, settings: dict[str, Any]) -> "CachedTrend":
        table_url, verdict_url = storage.join(out_url, TABLE), storage.join(out_url, VERDICT)
        if not (storage.exists(table_url) and storage.exists(verdict_url)):
            return cls(None)
        try:
            if storage.read_json(verdict_url).get("settings") != settings:
                return cls(None)
            with storage.local_copy(table_url) as path:
                table = pq.read_table(path)
        except (OSError, ValueError, KeyError, pa.ArrowInvalid):
            return cls(None)  # unreadable or of another version: computed afresh
        return cls(table if table.schema.equals(TREND_SCHEMA) else None)

    def rows(self, route: str) -> dict[tuple[str, str], dict[str, Any]]:
        """{(gallery hash, day): row} of a route (written route by route, so each route is one slice)."""
        if route not in self.groups:
            return {}
        start, end = self.groups[route]
        return {(row["gallery_hash"], row["day"]): row for row in self.table.slice(start, end - start).to_pylist()}


def nights_to_read(ordered: list[NightPartition], cached: dict[tuple[str, str], dict[str, Any]], window: int,
                   baseline: int) -> tuple[set[NightPartition], set[NightPartition]]:
    """(the nights whose rows are computed again: those not in the previous trend and the route's last `RECHECK`;
    the nights whose tables are read: those, and the history their drift tests need, each gallery's first
    ``baseline`` nights with scores and the ``window`` nights with scores before its first night computed again).
    Whether a night computed again has scores is known only once it is read, so the first ``baseline`` previous
    nights with scores are read too: the first ``baseline`` with scores are among them and those computed again."""
    recompute = {p for p in ordered if (p.gallery_hash, p.day) not in cached} | set(ordered[-RECHECK:])
    needed = set(recompute)
    for gallery_hash in dict.fromkeys(p.gallery_hash for p in ordered):
        nights = [p for p in ordered if p.gallery_hash == gallery_hash]
        scored = [p for p in nights if p in recompute or (cached[(p.gallery_hash, p.day)]["ok"] or 0) > 0]
        needed.update([p for p in scored if p not in recompute][:baseline])
        first = next((i for i, p in enumerate(scored) if p in recompute), None)
        if first is not None:
            needed.update(scored[max(0, first - window):first])
    return recompute, needed


def _placeholder(partition: NightPartition) -> Night:
    """A night without scores: one with no table, or one whose row comes from the previous trend and whose scores no
    test needs (not read)."""
    return Night(partition.day, partition.gallery_hash, np.zeros(0), None, 0)


def run_trend(scores_root: str, out_url: str, say: Callable[[str], None] = LOG.info,
              rule: DriftRule = DriftRule()) -> dict[str, Any]:
    """Write ``out_url``/trend.parquet (one row per route and night), trend.json (the verdict: ``status`` "alert"
    when any route's last night warns, with those warnings) and index.html; returns the verdict."""
    started = time.monotonic()
    settings = asdict(rule)
    storage.makedirs(out_url)
    series_all: list[Series] = []
    verdict: dict[str, Any] = {"root": scores_root, "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "settings": settings, "routes": {}, "alerts": []}
    nights_read = nights_total = 0
    previous = CachedTrend.read(out_url, settings)
    readers = READERS["local" if storage.is_local(scores_root) else "remote"]
    with tempfile.TemporaryDirectory(prefix="spade-trend-") as tmp, ThreadPoolExecutor(readers) as pool:
        table_path = os.path.join(tmp, TABLE)
        writer = pq.ParquetWriter(table_path, TREND_SCHEMA)
        try:
            for route, partitions in night_partitions(scores_root):
                references, notes = {}, []
                for gallery_hash in dict.fromkeys(p.gallery_hash for p in partitions):
                    references[gallery_hash], note = gallery_reference([p for p in partitions if p.gallery_hash == gallery_hash])
                    if note:
                        notes.append(note)
                ordered = sorted(partitions, key=lambda p: p.day)
                cached = previous.rows(route)
                recompute, needed = nights_to_read(ordered, cached, rule.window, rule.baseline)
                computed = assess(pool.map(lambda p: _night(p) if p in needed else _placeholder(p), ordered), references,
                                  rule)
                rows = [fresh if p in recompute else cached[(p.gallery_hash, p.day)] for p, fresh in zip(ordered, computed)]
                nights_read += len(needed)
                nights_total += len(rows)
                writer.write_table(pa.Table.from_pylist([{**row, "route": route} for row in rows], schema=TREND_SCHEMA))
                series_all.append(_series(route, rows, references.get(partitions[-1].gallery_hash), partitions[-1]))
                last = rows[-1]
                warned = [row["day"] for row in rows if row["warnings"]]
                verdict["routes"][route] = {
                    "last_night": last["day"], "gallery_hash": last["gallery_hash"], "nights": len(rows),
                    "warnings": last["warnings"], "first_warning": warned[0] if warned else None,
                    "flagged_share": last["flagged_share"], "notes": notes}
                if last["warnings"]:
                    verdict["alerts"].append({"route": route, "day": last["day"], "warnings": last["warnings"]})
        finally:
            writer.close()
        storage.atomic_put_file(table_path, storage.join(out_url, TABLE))
    verdict["status"] = "alert" if verdict["alerts"] else "clear"
    verdict["seconds"] = round(time.monotonic() - started, 2)
    verdict["nights_read"] = nights_read
    storage.write_json(storage.join(out_url, VERDICT), verdict)
    storage.atomic_write_bytes(storage.join(out_url, PAGE),
                               render(scores_root, series_all, settings, verdict["generated_at"]).encode())
    if not series_all:
        raise FileNotFoundError(f"{scores_root} holds no nightly partitions (gallery=*/date=*): point --scores at the "
                                "--out of `spade score --date`")
    say(f"trend: {nights_total} night(s) of {len(series_all)} route(s) ({nights_read} night table(s) read, the others "
        f"from the previous trend) in {verdict['seconds']:.1f}s; "
        f"{len(verdict['alerts'])} route(s) warn on their last night -> {storage.join(out_url, PAGE)}, "
        f"{storage.join(out_url, VERDICT)}, {storage.join(out_url, TABLE)}")
    for alert in verdict["alerts"]:
        say(f"trend: WARNING {alert['route'] or '(one gallery)'} {alert['day']}: {'; '.join(alert['warnings'])}")
    return verdict


def _series(route: str, rows: list[dict[str, Any]], reference: Reference | None, last: NightPartition) -> Series:
    return Series(route=route, days=[r["day"] for r in rows], p50=[r["p50"] for r in rows], p95=[r["p95"] for r in rows],
                  flagged_share=[r["flagged_share"] for r in rows], above_2sd=[r["above_normal_2sd"] for r in rows],
                  warned=[bool(r["warnings"]) for r in rows],
                  normal_2sd=None if reference is None else reference.mean + 2 * reference.std,
                  threshold=None if reference is None else reference.threshold, last=rows[-1],
                  flagged_images=_flagged_rows(last), galleries=list(dict.fromkeys(r["gallery_hash"] for r in rows)))
