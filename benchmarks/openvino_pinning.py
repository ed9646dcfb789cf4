"""The feature pass in several processes at once on one machine, OpenVINO's threads pinned to cores (its default on
Linux) against unpinned (`spade.features.runtime.OpenVinoRuntime`'s ``pinning``, False since 2026-12-07).

A machine's SDK worker processes (a Flink or Spark worker pool, Dask's workers, two runs at once) each compile the
backbone; pinned, every process puts its first stream on the first core. For each shared set, ``--processes``
processes (each one thread, one stream per core as `spade score` sizes them) extract the set's first ``--images``
normal images, framed as the default config frames them, over and over for ``--seconds``, all at once: pinned, then
unpinned, ``--repeats`` times. Prints per set the mean ms per image of a process each way and their ratio, then

    RESULT pinning_<set>=<pinned ms / unpinned ms> ...

    python benchmarks/openvino_pinning.py [--processes 2] [--seconds 6] [--repeats 2] [--images 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_pass import DATA, ROOT, SETS, frames, options  # noqa: E402

sys.path.insert(0, str(ROOT))


def child(args) -> None:
    """One process's feature pass on set ``args.set``, pinned or not: prints ``ms <per image>``."""
    import torch

    from spade.config import load_config
    from spade.features import runtime
    from spade.features.backbone import FeatureExtractor

    torch.set_num_threads(1)
    config, batch = frames(DATA / args.set, args.images, load_config(str(ROOT / "configs" / "default.yaml")))
    shared = FeatureExtractor(config.replace(feature_runtime="openvino")).runtime
    extract = runtime.OpenVinoRuntime(shared.net, shared.key, threads=1, precision=config.feature_precision,
                                      pinning=args.child == "pinned")
    batches = [batch[i:i + config.batch_size] for i in range(0, batch.shape[0], config.batch_size)]
    for part in batches:  # compiled, and each batch size met once
        extract(part)
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
        for part in batches:
            extract(part)
            images += part.shape[0]
    print(f"ms {(time.perf_counter() - started) * 1000 / images:.3f}", flush=True)


def together(args, name: str, way: str) -> float:
    """The mean ms per image of ``args.processes`` processes extracting at once, ``way`` pinned or unpinned."""
    command = [sys.executable, __file__, "--child", way, "--set", name, "--images", str(args.images),
               "--seconds", str(args.seconds)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for _ in range(args.processes)]
    times = []
    for process in children:
        out, _ = process.communicate()
        lines = [line for line in out.splitlines() if line.startswith("ms ")]
        if process.returncode or not lines:
            raise SystemExit(f"a {way} child on {name} failed (exit {process.returncode}): {out[-500:]}")
        times.append(float(lines[-1].split()[1]))
    return statistics.mean(times)


def main() -> None:
    parser = options(__doc__, repeats=2)
    parser.add_argument("--processes", type=int, default=2, help="processes extracting at once")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long each process extracts")
    parser.add_argument("--child", choices=("pinned", "unpinned"), help=argparse.SUPPRESS)
    parser.add_argument("--set", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"load average {os.getloadavg()[0]:.2f}")
    results = []
    for name in SETS:
        if not (DATA / name).is_dir():
            print(f"{name}: skipped ({DATA / name} is absent)")
            continue
        best = {"pinned": float("inf"), "unpinned": float("inf")}
        for _ in range(args.repeats):
            for way in best:
                best[way] = min(best[way], together(args, name, way))
        ratio = best["pinned"] / best["unpinned"]
        print(f"{name}: {args.processes} processes at once, ms per image each: pinned {best['pinned']:.2f}, "
              f"unpinned {best['unpinned']:.2f} ({ratio:.2f}x)", flush=True)
        results.append((f"pinning_{name}", ratio))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("RESULT " + " ".join(f"{name}={ratio:.2f}" for name, ratio in results))


if __name__ == "__main__":
    main()
