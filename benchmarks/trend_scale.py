"""`spade trend` over years of nights: wall time and peak RSS for 1,000 nights x 50 galleries, against 1 gallery.

Writes (once, cached in --work) a synthetic nightly root laid out as routed `spade score --date` writes it:
``line=Lnn/camera=top/gallery=<hash>/date=<day>/scores/part-0.parquet`` (the score table's columns, ``--images``
rows a night, scores drifting on a few lines) with one run.json per gallery. Each trend runs in a fresh process
(`spade trend` as an operator runs it); its peak RSS is ``ru_maxrss`` of that child. Prints one line per size, then

    RESULT again_seconds=<the re-run> seconds=<50 galleries> per_night_ms=<...> rss_mb=<50 galleries> rss_ratio=<50 galleries / 1 gallery>

A bounded trend has rss_ratio near 1 (it holds one route's nights at a time). A second trend into the same --out
(what a nightly job does) reuses the first's rows and reads only each route's last nights and the history their drift
tests need: ``again_seconds``.

    python benchmarks/trend_scale.py [--nights 1000] [--galleries 50] [--images 40] [--work /tmp/spade-trend-scale]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_root(root: str, galleries: int, nights: int, images: int) -> None:
    """The synthetic nightly root (skipped when a complete one is there)."""
    from spade.io.tables import SCORES_SCHEMA

    done = os.path.join(root, "_complete")
    if os.path.exists(done):
        return
    rng = np.random.default_rng(0)
    first = date(2024, 1, 1)
    for g in range(galleries):
        gallery = f"{g:016x}"
        route = os.path.join(root, f"line=L{g:02d}", "camera=top", f"gallery={gallery}")
        drift = 0.002 if g % 10 == 3 else 0.0
        for n in range(nights):
            day = (first + timedelta(days=n)).isoformat()
            folder = os.path.join(route, f"date={day}")
            os.makedirs(os.path.join(folder, "scores"), exist_ok=True)
            scores = rng.normal(1.0 + drift * n, 0.1, images)
            rows = {"uri": [f"s3://plant/archive/line=L{g:02d}/camera=top/date={day}/{i:05d}.png" for i in range(images)],
                    "image_id": [f"{g:04x}{n:06x}{i:06x}" for i in range(images)], "image_score": scores,
                    "is_anomalous": scores > 1.1645, "status": ["ok"] * images,
                    "map_uri": [f"s3://plant/nightly/maps/{g}-{n}-{i}.png" for i in range(images)]}
            table = pa.Table.from_pydict({f.name: rows.get(f.name, [None] * images) for f in SCORES_SCHEMA},
                                         schema=SCORES_SCHEMA)
            pq.write_table(table, os.path.join(folder, "scores", "part-0.parquet"))
        with open(os.path.join(route, f"date={(first + timedelta(days=nights - 1)).isoformat()}", "run.json"), "w") as f:
            json.dump({"gallery": f"s3://plant/galleries/L{g:02d}-top", "gallery_hash": gallery,
                       "thresholds": {"image": 1.1645, "image_score": "combined_top"},
                       "normal": {"images": 100, "mean": 1.0, "std": 0.1,
                                  "quantiles": [float(q) for q in 1.0 + 0.1 * np.sort(rng.normal(size=21))]}}, f)
        print(f"  wrote gallery {g + 1}/{galleries}", file=sys.stderr, flush=True)
    open(done, "w").close()


def one_trend(root: str, out: str) -> dict:
    """In a fresh process: `spade trend`; its wall time and peak RSS."""
    started = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "pipelines.cli", "--quiet", "trend", "--scores", root, "--out", out],
                          cwd=ROOT).returncode
    seconds = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(os.path.join(out, "trend.json")) as handle:
        verdict = json.load(handle)
    return {"seconds": seconds, "rss_mb": rss_mb, "exit": code, "alerts": len(verdict["alerts"]),
            "nights_read": verdict["nights_read"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=1000)
    parser.add_argument("--galleries", type=int, default=50)
    parser.add_argument("--images", type=int, default=40, help="score rows a night")
    parser.add_argument("--work", default="/tmp/spade-trend-scale")
    args = parser.parse_args()
    big = os.path.join(args.work, f"root-{args.galleries}x{args.nights}x{args.images}")
    small = os.path.join(args.work, f"root-1x{args.nights}x{args.images}")
    write_root(small, 1, args.nights, args.images)
    write_root(big, args.galleries, args.nights, args.images)
    print(f"load average {os.getloadavg()[0]:.2f}")
    baseline = one_trend(small, os.path.join(args.work, "trend-1"))  # first: ru_maxrss of children is a running max
    print(f"1 gallery x {args.nights} nights: {baseline['seconds']:.1f}s, peak RSS {baseline['rss_mb']:.0f} MB")
    out = os.path.join(args.work, f"trend-{args.galleries}")
    shutil.rmtree(out, ignore_errors=True)  # the first trend reads every night
    result = one_trend(big, out)
    tables = args.galleries * args.nights
    print(f"{args.galleries} galleries x {args.nights} nights ({tables} night tables of {args.images} rows): "
          f"{result['seconds']:.1f}s, peak RSS {result['rss_mb']:.0f} MB, {result['alerts']} route(s) alerting, "
          f"exit {result['exit']}")
    again = one_trend(big, out)  # the next night's trend: the previous one's rows reused
    print(f"again into the same --out (nothing new; {again['nights_read']} night tables read): {again['seconds']:.1f}s")
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"RESULT again_seconds={again['seconds']:.1f} seconds={result['seconds']:.1f} per_night_ms={1000 * result['seconds'] / tables:.2f} "
          f"rss_mb={result['rss_mb']:.0f} rss_ratio={result['rss_mb'] / baseline['rss_mb']:.2f}")


if __name__ == "__main__":
    main()
