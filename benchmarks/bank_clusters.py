"""Memory banks searched in clusters (`spade.index.bank_clusters`) against searched whole, on the shared sets.

    python benchmarks/bank_clusters.py [--rounds 3] [--images 32] [--run label=set:config[:key=value,...] ...]

Each row fits a gallery in memory (framing_cost.py's `prepare`: the set's train images, banks built as fit builds them),
then scores ``--images`` test images as a worker does (preprocess, features, kNN, correspondence, maps, image score),
with banks of `MIN_VECTORS` or more searched whole and in clusters, alternately for ``--rounds`` rounds after a
warm-up, in one process. Prints scoring CPU seconds per image (process time, all threads; median of rounds), the
ratio whole / clustered, and the largest difference between the two searches' score maps and image scores (the search
is exact: 0 unless two bank vectors tie in float32). The last line is machine-readable:

    RESULT <label>:<set>=<CPU ratio> ... max_map_diff=<largest over rows>
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from framing_cost import SHARED, prepare  # noqa: E402
from spade.index import coreset, patch_bank  # noqa: E402
from spade.index.bank_clusters import MIN_VECTORS  # noqa: E402
from spade.scoring.correspondence import configure_threads  # noqa: E402

DEFAULT_RUNS = tuple(f"{label}={name}:configs/{label}.yaml" for label in ("approximate", "default")
                     for name in ("mvtec_ad_bottle", "mpdd_metal_plate", "mvtec3d_tire", "kolektorsdd_commutator"))
WHOLE = 1 << 62  # a bank-size threshold no bank reaches: every bank searched whole


def bank_sizes() -> str:
    """The coreset and patch banks this process holds (cleared before each row)."""
    banks = [*coreset._BANKS.values(), *patch_bank._BANKS.values()]
    return ", ".join(f"{len(b.vectors)}x{b.vectors.shape[1]}" for b in sorted(banks, key=lambda b: -len(b.vectors)))


def alternate(scorer, rounds: int, modes: dict) -> dict:
    """Score with each of ``modes`` (name -> a function that switches the process to it) in turn, ``rounds`` rounds
    after a warm-up round (caches, clusters, packed panels): each mode's CPU s per image (median) and the largest
    difference between the first two modes' maps (``map_diff``) and image scores (``score_diff``)."""
    cpu = {mode: [] for mode in modes}
    results = {}
    for round_no in range(rounds + 1):
        for mode, switch in modes.items():
            switch()
            start = time.process_time()
            results[mode] = scorer.score()
            if round_no:
                cpu[mode].append((time.process_time() - start) / len(scorer.test))
    first, second = (results[mode] for mode in list(modes)[:2])
    return {mode: statistics.median(values) for mode, values in cpu.items()} | {
        "map_diff": max(float(np.max(np.abs(a[0] - b[0]))) for a, b in zip(first, second)),
        "score_diff": max(abs(a[1] - b[1]) for a, b in zip(first, second))}


def scorers(runs, gallery: int, images: int):
    """(label, set, scorer) for each ``label=set:config[:key=value,...]`` of ``runs``, the process's banks cleared
    before each (framing_cost.py's `prepare`: a gallery of ``gallery`` train images, ``images`` test images)."""
    for item in runs:
        label, _, rest = item.partition("=")
        name, _, spec = rest.partition(":")
        coreset._BANKS.clear()
        patch_bank._BANKS.clear()
        yield label, name, prepare(SHARED / name if not Path(name).is_dir() else Path(name), spec, gallery, images)


def arguments(doc: str) -> argparse.ArgumentParser:
    """The command line of a benchmark that alternates two modes over `scorers` (this one's, bf16_screen.py's)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", help="label=set:config[:key=value,...] (repeatable)")
    parser.add_argument("--gallery", type=int, default=250, help="train images in the gallery (default 250: all)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def table(args, compare, first: str, second: str, default_runs, extra=None) -> None:
    """Each run's table row (`scorers`; ``compare(scorer, rounds)`` gives the two modes' CPU s per image and the
    results' gap): the banks, ``first`` and ``second``'s CPU, their ratio, ``extra(found)``'s cells where given and the
    gap; then the load average and the RESULT line of the ratios and the largest map difference."""
    ratios, worst = [], 0.0
    for label, name, scorer in scorers(args.run or default_runs, args.gallery, args.images):
        found = compare(scorer, args.rounds)
        ratio = found[first] / found[second]
        ratios.append(f"{label}:{name}={ratio:.2f}")
        worst = max(worst, found["map_diff"])
        cells = [label, name, bank_sizes(), f"{found[first]:.3f}", f"{found[second]:.3f}", f"{ratio:.2f}",
                 *([extra(found)] if extra else []), f"{found['map_diff']:.2g} / {found['score_diff']:.2g}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("RESULT " + " ".join(ratios) + f" max_map_diff={worst:.2g}")


def compare(scorer, rounds: int) -> dict:
    """Alternate whole and clustered searches of the same scorer: CPU s per image (medians) and the results' gap."""
    def threshold(value: int):
        return lambda: setattr(coreset, "CLUSTERED_MIN", value)

    try:
        return alternate(scorer, rounds, {"whole": threshold(WHOLE), "clusters": threshold(MIN_VECTORS)})
    finally:
        coreset.CLUSTERED_MIN = MIN_VECTORS


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__).parse_args(argv)
    configure_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}; banks of {MIN_VECTORS}+ vectors in clusters")
    print("| run | set | banks (vectors x channels) | CPU s / image, whole | in clusters | ratio | max map / score diff |")
    print("|---|---|---|---|---|---|---|")
    table(args, compare, "whole", "clusters", DEFAULT_RUNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
