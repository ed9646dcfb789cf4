"""Beam run settings of `spade fit` / `spade score`: batch size, local workers and threads, side by side in one process.

    python benchmarks/run_settings.py                        # metal_plate and bottle, default + approximate configs
    python benchmarks/run_settings.py --data ../shared/data/mvtec_ad_bottle --config configs/default.yaml --reps 5

For each set and config: one gallery is fitted (not timed), then each setting runs the whole `run_score` call that
`spade score` makes (Beam pipeline on the local FnApiRunner: list, read, extract, score, write PNG and Parquet;
interpreter start and imports excluded), the settings alternating round by round so a drifting machine moves them
alike. With ``--fit`` the `run_fit` call is timed the same way. Printed per setting: median images/s, its ratio to
the first setting (the baseline), CPU utilisation (process CPU seconds, all threads, over wall seconds: 2.0 is both
cores of a 2-core machine busy) and the load average. A setting is ``batch_size[xWORKERS]``: ``16`` is batch 16 in one
worker with every core's threads; ``8x2`` two local workers (``--direct_num_workers 2``, threads) with cores/2
threads each (`pipelines.options.with_worker_threads`). The last line is machine-readable:

    RESULT <set>/<config>/<setting>=<ratio to the baseline> ...
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.fit import run_fit  # noqa: E402
from pipelines.options import with_worker_threads  # noqa: E402
from pipelines.score import run_score  # noqa: E402
from spade.config import load_config  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_SETS = ("mpdd_metal_plate", "mvtec_ad_bottle")
DEFAULT_CONFIGS = ("configs/default.yaml", "configs/approximate.yaml")
DEFAULT_SETTINGS = ("8", "16", "32", "8x2", "16x2")


def parse_setting(text: str) -> tuple[int, int]:
    """``"16x2"`` -> (batch size 16, 2 local workers); ``"16"`` -> (16, 1)."""
    batch, _, workers = text.partition("x")
    return int(batch), int(workers or 1)


def beam_args(workers: int) -> list[str]:
    return [] if workers == 1 else [f"--direct_num_workers={workers}", "--direct_running_mode=multi_threading"]


def timed(call) -> tuple[float, float]:
    """(wall s, process CPU s) of ``call()``."""
    start, cpu = time.perf_counter(), os.times()
    call()
    end = os.times()
    return time.perf_counter() - start, (end.user - cpu.user) + (end.system - cpu.system)


def measure(data: Path, config_path: str, settings: list[str], reps: int, fit: bool, work: Path) -> list[dict]:
    base = load_config(str(ROOT / config_path))
    gallery = str(work / "gallery")
    run_fit(base, str(data), gallery, [], lambda m: None)
    rows = {s: {"setting": s, "score": [], "score_cpu": [], "fit": [], "fit_cpu": []} for s in settings}
    images = 0
    for rnd in range(reps + 1):  # round 0 warms caches (OpenVINO compile, page cache) and is not kept
        for setting in settings:
            batch, workers = parse_setting(setting)
            args = beam_args(workers)
            config = with_worker_threads(base.replace(batch_size=batch), args)
            out = work / "scores"
            shutil.rmtree(out, ignore_errors=True)
            summary = {}
            wall, cpu = timed(lambda: summary.update(run_score(config, gallery, str(data), str(out), args, lambda m: None)))
            images = summary["rows"]
            if rnd:
                rows[setting]["score"].append(images / wall)
                rows[setting]["score_cpu"].append(cpu / wall)
            if fit:
                target = work / "refit"
                shutil.rmtree(target, ignore_errors=True)
                wall, cpu = timed(lambda: run_fit(config, str(data), str(target), args, lambda m: None))
                if rnd:
                    rows[setting]["fit"].append(wall)
                    rows[setting]["fit_cpu"].append(cpu / wall)
    result = []
    for setting in settings:
        row = rows[setting]
        entry = {"setting": setting, "images": images, "score_images_s": statistics.median(row["score"]),
                 "score_utilisation": statistics.median(row["score_cpu"]), "runs": [round(v, 2) for v in row["score"]]}
        if fit:
            entry.update(fit_s=statistics.median(row["fit"]), fit_utilisation=statistics.median(row["fit_cpu"]))
        result.append(entry)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", help="an MVTec-layout folder; repeat (default: metal_plate, bottle)")
    parser.add_argument("--config", action="append", help="a config YAML; repeat (default: default + approximate)")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help="comma-separated batch_size[xWORKERS]; the first is the baseline")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--fit", action="store_true", help="also time run_fit per setting")
    args = parser.parse_args()
    sets = [Path(d) for d in (args.data or [SHARED / name for name in DEFAULT_SETS])]
    missing = [str(d) for d in sets if not (d / "train").is_dir()]
    if missing:
        raise SystemExit(f"not MVTec-layout folders (train/good, test/*): {missing}; pass --data")
    settings = args.settings.split(",")
    results = []
    for data in sets:
        for config_path in args.config or DEFAULT_CONFIGS:
            with tempfile.TemporaryDirectory(prefix="spade-settings-") as work:
                rows = measure(data, config_path, settings, args.reps, args.fit, Path(work))
            base = rows[0]
            print(f"\n{data.name}, {config_path}: {base['images']} test images, {args.reps} rounds, "
                  f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
            print("| setting | score images/s | ratio | CPU utilisation | runs |" + (" fit s | fit ratio |" if args.fit else ""))
            print("|---|---|---|---|---|" + ("---|---|" if args.fit else ""))
            for row in rows:
                ratio = row["score_images_s"] / base["score_images_s"]
                line = (f"| {row['setting']} | {row['score_images_s']:.2f} | {ratio:.2f} | {row['score_utilisation']:.2f} "
                        f"| {row['runs']} |")
                if args.fit:
                    line += f" {row['fit_s']:.1f} | {base['fit_s'] / row['fit_s']:.2f} |"
                print(line, flush=True)
                results.append((f"{data.name}/{Path(config_path).stem}/{row['setting']}", ratio))
    print("RESULT " + " ".join(f"{label}={ratio:.3f}" for label, ratio in results))


if __name__ == "__main__":
    main()
