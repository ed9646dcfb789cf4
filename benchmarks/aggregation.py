"""The 3x3 neighbourhood aggregation of the feature pass (`spade.features.backbone.aggregate_neighbourhood`) against
torch's ``avg_pool2d`` (the code before it), on the layer maps of real frames of the four shared sets.

For each set, the first ``--images`` normal images are framed as the default config frames them and run through its
backbone (OpenVINO, bf16 where the CPU has it) without aggregation; both aggregations are then timed on each batch's
raw maps (``batch_size`` frames' tiles, every layer), alternately in one process, best of ``--repeats``. Prints per
set ms per image of each, their ratio and the largest difference between them, then

    RESULT aggregation_speedup_<set>=<avg_pool2d / shipped> ... max_abs_diff=<largest>

    python benchmarks/aggregation.py [--images 16] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference(maps: torch.Tensor, size: int) -> torch.Tensor:
    """The aggregation before: torch's average pooling, padding not counted."""
    return torch.nn.functional.avg_pool2d(maps, size, stride=1, padding=size // 2, count_include_pad=False).contiguous()


def main() -> None:
    from benchmarks.feature_pass import alternate, options, result_line, shared_sets
    args = options(__doc__, repeats=5).parse_args()
    from spade.features.backbone import FeatureExtractor, aggregate_neighbourhood

    results, worst = [], 0.0
    for name, config, batch in shared_sets(args):
        size = config.feature_aggregation
        extractor = FeatureExtractor(config.replace(feature_aggregation=1))
        raw = []  # each batch's tiles' raw layer maps, as the extractor's runtime gives them
        for start in range(0, batch.shape[0], config.batch_size):
            frames_ = batch[start:start + config.batch_size]
            framing = extractor._framing(tuple(frames_.shape[-2:]))
            raw.append(extractor.runtime(frames_ if framing is None else framing.cut(frames_))[1])
        ways = {"avg_pool2d": reference, "shipped": lambda maps, k: aggregate_neighbourhood(maps, k).contiguous()}
        timings, _ = alternate({way: lambda aggregate=aggregate: [aggregate(maps[layer], size) for maps in raw
                                                                  for layer in config.layers]
                                for way, aggregate in ways.items()}, args.repeats, batch.shape[0])
        diff = max(float((reference(maps[layer], size) - aggregate_neighbourhood(maps[layer], size)).abs().max())
                   for maps in raw for layer in config.layers)
        worst = max(worst, diff)
        speedup = timings["avg_pool2d"] / timings["shipped"]
        results.append((f"aggregation_speedup_{name}", speedup))
        shapes = ", ".join("x".join(map(str, raw[0][layer].shape)) for layer in config.layers)
        print(f"{name}: frame {config.frame_size[0]}x{config.frame_size[1]} (maps of a batch {shapes}): avg_pool2d "
              f"{timings['avg_pool2d']:.3f} ms/image, shipped {timings['shipped']:.3f} ms/image ({speedup:.2f}x), "
              f"max |diff| {diff:.1e}", flush=True)
    result_line(results, worst)


if __name__ == "__main__":
    main()
