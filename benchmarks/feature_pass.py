"""The feature pass per image on the four shared sets: the NCHW reference ("eager") against channels-last and
OpenVINO, in float32 or (``runtime:bf16``) bfloat16.

For each set, the first ``--images`` normal images are framed as the default config frames them (its frame size from
their median aspect, its tiles) and extracted in batches of ``batch_size`` by every runtime in one process,
alternately, best of ``--repeats`` (torch and OpenVINO threads: ``--threads``; OpenVINO's conversion is done before
the clock starts, as a worker finds it in its machine's cache). Prints per set the ms per image of each, their ratio
to eager and the largest difference of any feature from eager's (for bf16 also over the largest feature), then

    RESULT channels_last_<set>=<eager / channels_last> openvino_<set>=<eager / openvino> ... max_abs_diff=<largest>

where max_abs_diff is over the float32 runtimes.

    python benchmarks/feature_pass.py [--images 16] [--repeats 3] [--threads 2] [--runtimes channels_last,openvino]
    python benchmarks/feature_pass.py --runtimes openvino,openvino:bf16
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
DATA = ROOT.parent / "shared" / "data"
SETS = ("mvtec_ad_bottle", "mpdd_metal_plate", "mvtec3d_tire", "kolektorsdd_commutator")


def options(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The shared-set benchmarks' common options: ``--images``, ``--repeats``, ``--threads``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def shared_sets(args: argparse.Namespace, config=None):
    """(set name, config, frames) for each shared set beside the project, its first ``args.images`` normal images
    framed as ``config`` (configs/default.yaml if None) frames them; a set that is absent is said and skipped. Sets
    torch's threads to ``args.threads`` and prints the load average first."""
    from spade.config import load_config

    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}")
    config = config or load_config(str(ROOT / "configs" / "default.yaml"))
    for name in SETS:
        if not (DATA / name).is_dir():
            print(f"{name}: skipped ({DATA / name} is absent)")
            continue
        yield (name, *frames(DATA / name, args.images, config))


def alternate(ways: dict, repeats: int, images: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each of ``ways`` ({name: a call doing the whole work}) run in turn ``repeats`` times: the best wall and process
    CPU ms per image of each."""
    wall = {way: float("inf") for way in ways}
    cpu = dict(wall)
    for _ in range(repeats):
        for way, work in ways.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            work()
            wall[way] = min(wall[way], (time.perf_counter() - started) * 1000 / images)
            cpu[way] = min(cpu[way], (time.process_time() - started_cpu) * 1000 / images)
    return wall, cpu


def result_line(results: list[tuple[str, float]], worst: float) -> None:
    """The load average after the run, then ``RESULT <name>=<ratio> ... max_abs_diff=<worst>``."""
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("RESULT " + " ".join(f"{name}={ratio:.2f}" for name, ratio in results) + f" max_abs_diff={worst:.1e}")


def frames(folder: Path, count: int, config):
    from spade.features.framing import frame_size_for, framing_for
    from spade.io.images import decode_rgb, preprocess
    from spade.io.listing import fix_brightness

    config = fix_brightness(config, str(folder))[0]
    paths = sorted(p for p in (folder / "train" / "good").iterdir() if not p.name.startswith("."))[:count]
    images = [decode_rgb(p.read_bytes()) for p in paths]
    config = config.replace(frame_size=frame_size_for([(im.shape[1], im.shape[0]) for im in images], config.resize))
    framing = framing_for(config)
    batch = torch.stack([preprocess(im, config.resize, config.crop, config.mean, config.std, framing, config.brightness)
                         for im in images])
    return config, batch


def timed(extractor, batch: torch.Tensor, step: int) -> tuple[float, list]:
    started = time.perf_counter()
    out = [extractor(batch[i:i + step]) for i in range(0, batch.shape[0], step)]
    return (time.perf_counter() - started) * 1000 / batch.shape[0], out


def main() -> None:
    parser = options(__doc__, repeats=3)
    parser.add_argument("--runtimes", default="channels_last,openvino",
                        help="compared with eager, comma-separated; runtime:bf16 runs it with feature_precision bf16")
    args = parser.parse_args()
    from spade.config import SpadeConfig
    from spade.features.backbone import FeatureExtractor

    results, worst = [], 0.0
    for name, config, batch in shared_sets(args, SpadeConfig()):
        names = ["eager", *args.runtimes.split(",")]
        runtimes = {}
        for spec in names:  # runtime[:precision]
            runtime, _, precision = spec.partition(":")
            runtimes[spec] = FeatureExtractor(config.replace(feature_runtime=runtime, feature_precision=precision or "f32"))
        for extractor in runtimes.values():
            extractor(batch[:config.batch_size])  # warm-up: OpenVINO converts (or reads its cache) and compiles here
        best = {runtime: float("inf") for runtime in runtimes}
        outputs = {}
        for _ in range(args.repeats):
            for runtime, extractor in runtimes.items():
                ms, outputs[runtime] = timed(extractor, batch, config.batch_size)
                best[runtime] = min(best[runtime], ms)
        line = [f"{name}: frame {config.frame_size[0]}x{config.frame_size[1]}, eager {best['eager']:.1f} ms/image"]
        for runtime in names[1:]:
            diff = max(max(float(np.abs(a.pyramid[layer] - b.pyramid[layer]).max()) for layer in config.layers)
                       for a, b in zip(outputs["eager"], outputs[runtime]))
            diff = max(diff, max(float(np.abs(a.embedding - b.embedding).max())
                                 for a, b in zip(outputs["eager"], outputs[runtime])))
            top = max(max(float(np.abs(a.pyramid[layer]).max()) for layer in config.layers) for a in outputs["eager"])
            lowered = runtime.endswith(":bf16")
            worst = worst if lowered else max(worst, diff)
            speedup = best["eager"] / best[runtime]
            results.append((f"{runtime.replace(':', '_')}_{name}", speedup))
            relative = f", {diff / top:.1%} of the largest feature {top:.0f}" if lowered else ""
            line.append(f"{runtime} {best[runtime]:.1f} ms/image ({speedup:.2f}x, max |diff| {diff:.1e}{relative})")
        print(", ".join(line), flush=True)
    result_line(results, worst)


if __name__ == "__main__":
    main()
