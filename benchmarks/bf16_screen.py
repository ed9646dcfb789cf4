"""Searches screened in bfloat16 (`spade.index.fused_nearest.fold_bf16`: whole memory banks and the exact
correspondence) against the float32 kernel over every column, on the shared sets.

    python benchmarks/bf16_screen.py [--rounds 3] [--images 32] [--run label=set:config[:key=value,...] ...]

Each row fits a gallery in memory (framing_cost.py's `prepare`) and scores ``--images`` test images as a worker does,
with ``search_kernel: float32`` and ``auto`` (the screen, where the CPU has AVX512-BF16) alternately for ``--rounds``
rounds after a warm-up, in one process. Prints scoring CPU seconds per image (process time, all threads; median of
rounds), their ratio, what the screened searches compared exactly (columns a query; queries whose candidates
overflowed into the whole float32 search) and the largest difference between the two runs' maps and image scores
(0: the screen settles every query in the float32 kernel's own arithmetic). The last line is machine-readable:

    RESULT <label>:<set>=<CPU ratio float32 / auto> ... max_map_diff=<largest over rows>
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

from bank_clusters import bank_sizes  # noqa: E402
from framing_cost import SHARED, prepare  # noqa: E402
from spade.index import coreset, fused_nearest, patch_bank  # noqa: E402
from spade.scoring.correspondence import configure_threads  # noqa: E402

DEFAULT_RUNS = tuple(f"default={name}:configs/default.yaml"
                     for name in ("mvtec_ad_bottle", "mpdd_metal_plate", "mvtec3d_tire", "kolektorsdd_commutator"))


class Tally:
    """What the screened searches of a round compared: queries, columns compared exactly, overflowed queries."""

    def __init__(self) -> None:
        self.queries = self.compared = self.overflowed = 0
        self._fold = fused_nearest.fold_bf16

    def __enter__(self) -> "Tally":
        def counted(q, *args, **kwargs):
            compared, overflowed = self._fold(q, *args, **kwargs)
            self.queries, self.compared, self.overflowed = (self.queries + len(q), self.compared + compared,
                                                            self.overflowed + overflowed)
            return compared, overflowed
        fused_nearest.fold_bf16 = counted
        return self

    def __exit__(self, *exc) -> None:
        fused_nearest.fold_bf16 = self._fold


def compare(scorer, rounds: int) -> dict:
    """Alternate the float32 and screened searches of the same scorer: CPU s per image (medians), the screen's
    tally and the results' gap."""
    cpu = {"float32": [], "auto": []}
    results = {}
    with Tally() as tally:
        for round_no in range(rounds + 1):
            for kernel in cpu:
                scorer.config = scorer.config.replace(search_kernel=kernel)
                start = time.process_time()
                results[kernel] = scorer.score()
                if round_no:  # the first round warms caches and builds the panels
                    cpu[kernel].append((time.process_time() - start) / len(scorer.test))
    map_diff = max(float(np.max(np.abs(a[0] - b[0]))) for a, b in zip(results["float32"], results["auto"]))
    score_diff = max(abs(a[1] - b[1]) for a, b in zip(results["float32"], results["auto"]))
    return {kernel: statistics.median(values) for kernel, values in cpu.items()} | {
        "map_diff": map_diff, "score_diff": score_diff, "compared": tally.compared / max(1, tally.queries),
        "overflowed": tally.overflowed, "queries": tally.queries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", help="label=set:config[:key=value,...] (repeatable)")
    parser.add_argument("--gallery", type=int, default=250, help="train images in the gallery (default 250: all)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not fused_nearest.bf16_available():
        print("this CPU lacks AVX512-BF16 (or the kernel is not built): nothing to compare")
        return 1
    configure_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| run | set | banks (vectors x channels) | CPU s / image, float32 | screened | ratio | "
          "compared a query / overflowed of queries | max map / score diff |")
    print("|---|---|---|---|---|---|---|---|")
    ratios, worst = [], 0.0
    for item in args.run or DEFAULT_RUNS:
        label, _, rest = item.partition("=")
        name, _, spec = rest.partition(":")
        coreset._BANKS.clear()
        patch_bank._BANKS.clear()
        scorer = prepare(SHARED / name if not Path(name).is_dir() else Path(name), spec, args.gallery, args.images)
        found = compare(scorer, args.rounds)
        ratio = found["float32"] / found["auto"]
        ratios.append(f"{label}:{name}={ratio:.2f}")
        worst = max(worst, found["map_diff"])
        print(f"| {label} | {name} | {bank_sizes()} | {found['float32']:.3f} | {found['auto']:.3f} | {ratio:.2f} | "
              f"{found['compared']:.2f} / {found['overflowed']} of {found['queries']} | "
              f"{found['map_diff']:.2g} / {found['score_diff']:.2g} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("RESULT " + " ".join(ratios) + f" max_map_diff={worst:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
