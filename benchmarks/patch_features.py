"""The patch features behind the image score's bank term (`spade.index.patch_bank.patch_features`: each tile's layer 2
and layer 3 upsampled to layer 2's grid, joined position by position) against the NCHW formulation before it, on the
feature pyramids of real frames of the four shared sets.

For each set, the first ``--images`` normal images are framed as the default config frames them and run through its
backbone; both formulations are then timed on each batch's pyramid, alternately in one process, best of
``--repeats`` (wall and process CPU ms per image). Prints per set both, their ratios and the largest difference
between them, then

    RESULT patch_features_speedup_<set>=<NCHW / shipped, CPU> ... max_abs_diff=<largest>

    python benchmarks/patch_features.py [--images 16] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference(pyramid: dict[str, np.ndarray], layers, tiles: int) -> np.ndarray:
    """The formulation before: each tile's layers upsampled and joined in NCHW, then moved channels last."""
    size = pyramid[layers[0]].shape[2] // tiles, pyramid[layers[0]].shape[3]
    joined = []
    for layer in layers:
        maps = torch.from_numpy(np.ascontiguousarray(pyramid[layer], dtype=np.float32))
        by_tile = torch.stack(maps.chunk(tiles, 2), 1).flatten(0, 1)  # (B*T, C, h, w), frame by frame
        if by_tile.shape[-2:] != size:
            by_tile = F.interpolate(by_tile, size=size, mode="bilinear", align_corners=False)
        joined.append(by_tile)
    positions = torch.cat(joined, 1).permute(0, 2, 3, 1)
    return np.ascontiguousarray(positions.reshape(len(maps), -1, positions.shape[-1]).numpy())


def main() -> None:
    from benchmarks.feature_pass import alternate, options, result_line, shared_sets
    args = options(__doc__, repeats=5).parse_args()
    from spade.features.backbone import FeatureExtractor
    from spade.features.framing import framing_for
    from spade.index.patch_bank import patch_features

    results, diffs = [], []
    for name, config, batch in shared_sets(args):
        tiles, layers = len(framing_for(config).tiles), tuple(config.bank_layers)
        extractor = FeatureExtractor(config)
        pyramids = [extractor(batch[i:i + config.batch_size]).pyramid for i in range(0, batch.shape[0], config.batch_size)]
        wall, cpu = alternate({way: lambda join=join: [join(pyramid, layers, tiles) for pyramid in pyramids]
                               for way, join in (("NCHW", reference), ("shipped", patch_features))},
                              args.repeats, batch.shape[0])
        diffs.append(max(float(np.abs(reference(p, layers, tiles) - patch_features(p, layers, tiles)).max())
                         for p in pyramids))
        results.append((f"patch_features_speedup_{name}", cpu["NCHW"] / cpu["shipped"]))
        print(f"{name}: frame {config.frame_size[0]}x{config.frame_size[1]} ({tiles} tiles): NCHW {wall['NCHW']:.2f} ms "
              f"wall / {cpu['NCHW']:.2f} ms CPU per image, shipped {wall['shipped']:.2f} / {cpu['shipped']:.2f} "
              f"({wall['NCHW'] / wall['shipped']:.2f}x wall, {results[-1][1]:.2f}x CPU), max |diff| {diffs[-1]:.1e}",
              flush=True)
    result_line(results, max(diffs, default=0.0))


if __name__ == "__main__":
    main()
