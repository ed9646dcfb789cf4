"""Greedy coreset selection at fit: the compiled kernel that skips blocks (`spade.index.farthest_points`) against
torch's plain pass over every row, on the banks fit builds for the shared sets.

    python benchmarks/coreset_selection.py [--rounds 2] [--run label=set:config[:key=value,...] ...]

Each row fits a gallery in memory (framing_cost.py's `prepare`: the set's train images), recording the inputs of every
greedy selection its banks make (the layer banks of ``approximate_layers`` and the patch bank: candidates, bank size,
projection, seed), then selects each bank both ways, alternately for ``--rounds`` rounds, in one process, with the
run's threads. Prints the best wall seconds of each, their ratio, the share of the kept rows both chose (both are exact
up to float32 rounding: the plain pass's |x|^2 + |c|^2 - 2 x.c and the kernel's sum of squared differences round
differently, so where two candidates' distances tie within that rounding they may take different ones, and the
selections part a little from there), the share of the candidates a kernel step read, and the load average. The last line is machine-readable:

    RESULT <label>:<set>:<selection>=<plain s / kernel s> ... same_sets=<1 where every selection kept the same rows, else 0>
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from framing_cost import SHARED, prepare  # noqa: E402
from spade.index import coreset, farthest_points, patch_bank  # noqa: E402
from spade.scoring.correspondence import configure_threads  # noqa: E402

DEFAULT_RUNS = tuple(f"{label}={name}:configs/{label}.yaml" for label in ("default", "approximate")
                     for name in ("mvtec_ad_bottle", "mpdd_metal_plate", "mvtec3d_tire", "kolektorsdd_commutator"))


def recorded_selections(data: Path, spec: str, gallery_images: int) -> list[dict]:
    """The greedy selections fitting ``spec`` on ``data`` makes, in order: {"features", "n", "projection", "seed"}."""
    calls, real = [], coreset.greedy_coreset

    def record(features, n, start=None, projection=coreset.DEFAULT_PROJECTION, seed=0, **kwargs):
        calls.append({"features": features, "n": n, "projection": projection, "seed": seed})
        return real(features, n, start=start, projection=projection, seed=seed, **kwargs)

    coreset._BANKS.clear()
    patch_bank._BANKS.clear()
    coreset.greedy_coreset = record
    try:
        prepare(data, spec, gallery_images, 1)
    finally:
        coreset.greedy_coreset = real
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", help="label=set:config[:key=value,...] (repeatable)")
    parser.add_argument("--gallery", type=int, default=250, help="train images in the gallery (default 250: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    if not farthest_points.available():
        print(f"{farthest_points.EXTENSION} is not built here: reinstall with a C compiler (pip install -e .)")
        return 2
    print(f"load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads")
    print("| run | set | selection: candidates x channels -> kept (projection) | plain s | kernel s | ratio | rows both "
          "chose | rows a kernel step read (padding included) |")
    print("|---|---|---|---|---|---|---|---|")
    ratios, same_sets = [], True
    for item in args.run or DEFAULT_RUNS:
        label, _, rest = item.partition("=")
        name, _, spec = rest.partition(":")
        data = SHARED / name if not Path(name).is_dir() else Path(name)
        if not data.is_dir():
            print(f"| {label} | {name} | skipped: {data} is absent | | | | | |")
            continue
        for index, call in enumerate(recorded_selections(data, spec, args.gallery)):
            features, n = call["features"], call["n"]
            settings = {"projection": call["projection"], "seed": call["seed"]}
            times: dict[bool, list[float]] = {False: [], True: []}
            picks = {}
            for _ in range(args.rounds):
                for compiled in (False, True):
                    start = time.perf_counter()
                    picks[compiled] = coreset.greedy_coreset(features, n, compiled=compiled, **settings)
                    times[compiled].append(time.perf_counter() - start)
            shared = len(np.intersect1d(picks[False], picks[True])) / n
            same_sets &= shared == 1.0
            visits: list = []
            projected = 0 < settings["projection"] < features.shape[1]
            read = "(projected)"
            if not projected:  # the share read, on the unprojected rows the kernel searched
                farthest_points.farthest_points(features, n, int(picks[True][0]), visits=visits,
                                                threads=torch.get_num_threads())
                read = f"{visits[-1][1] / max(1, (n - 1) * len(features)):.1%}"
            plain, kernel = min(times[False]), min(times[True])
            ratios.append(f"{label}:{name}:{index + 1}={plain / kernel:.2f}")
            projection = settings["projection"] if projected else "none"
            print(f"| {label} | {name} | {index + 1}: {features.shape[0]} x {features.shape[1]} -> {n} "
                  f"({projection}) | {plain:.3f} | {kernel:.3f} | {plain / kernel:.2f} | {shared:.2%} | {read} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("RESULT " + " ".join(ratios) + f" same_sets={int(same_sets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
