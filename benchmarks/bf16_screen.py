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

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bank_clusters import alternate, arguments, table  # noqa: E402
from spade.index import fused_nearest  # noqa: E402
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
    def kernel(name: str):
        return lambda: setattr(scorer, "config", scorer.config.replace(search_kernel=name))

    with Tally() as tally:
        found = alternate(scorer, rounds, {"float32": kernel("float32"), "auto": kernel("auto")})
    return found | {"compared": tally.compared / max(1, tally.queries), "overflowed": tally.overflowed,
                    "queries": tally.queries}


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__).parse_args(argv)
    if not fused_nearest.bf16_available():
        print("this CPU lacks AVX512-BF16 (or the kernel is not built): nothing to compare")
        return 1
    configure_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| run | set | banks (vectors x channels) | CPU s / image, float32 | screened | ratio | "
          "compared a query / overflowed of queries | max map / score diff |")
    print("|---|---|---|---|---|---|---|---|")
    table(args, compare, "float32", "auto", DEFAULT_RUNS,
          lambda found: f"{found['compared']:.2f} / {found['overflowed']} of {found['queries']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
