"""Score-map rules compared on real MVTec-layout sets, from `image_decision.py`'s cached pass of the method.

    python benchmarks/map_rules.py                                   # the four shared sets, configs/default.yaml
    python benchmarks/map_rules.py --sigma 4 --sigma 2 --combine mean --combine geometric
    python benchmarks/map_rules.py --sigma 2 --edge-band 0 --edge-band 32 --edge-band 48 --edge-band 64

A pixel's score is its layers' correspondence distances, upsampled to the tile, combined, the tiles blended into
the frame and the frame smoothed (`spade.scoring.batch.finish_map`). This varies the last two steps on the cached
raw per-layer maps of every test image (`image_decision.run_set`, same cache: the pass runs once per set and
config) and prints pixel ROCAUC and PRO (full image) for each rule:

* ``--sigma``: the Gaussian smoothing of the frame, in frame pixels (the paper's 4; the default 2);
* ``--combine``: ``mean`` of the layers (the method's), ``geometric`` mean, or ``standardised`` (each layer's
  distances standardised by the mean and standard deviation of the calibration images' leave-one-out maps, then
  averaged);
* ``--edge-band``: the frame map lowered, within that many pixels of a tile's edge, by how far the calibration
  images' mean map (on the manifest's 8-pixel grid) rises there above its median further inside
  (`spade.scoring.position_baseline.edge_excess`, the config's ``map_edge_band``; 0: none). The cached pass makes
  the method's maps, so the config's own band is not applied unless asked for here.

The image decisions do not change with these rules but through ``map_top``; `image_decision.py` prints them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import image_decision  # noqa: E402
from spade.evaluation.metrics import auroc, pro_auc  # noqa: E402
from spade.features.framing import framing_for  # noqa: E402
from spade.scoring.correspondence import configure_threads  # noqa: E402
from spade.scoring.position_baseline import baseline_map, edge_excess, position_baseline  # noqa: E402
from spade.scoring.scoremap import combine_layer_maps, smooth  # noqa: E402


def combine(parts: list[np.ndarray], size: tuple[int, int], rule: str, stats: list[tuple[float, float]]) -> np.ndarray:
    """One tile's layer maps upsampled to ``size`` and combined by ``rule`` (``mean``: the method's
    `combine_layer_maps`)."""
    if rule == "standardised":
        parts = [(p - mean) / std for p, (mean, std) in zip(parts, stats)]
    if rule != "geometric":
        return combine_layer_maps(parts, size)
    ups = torch.stack([F.interpolate(torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32))[None, None], size=size,
                                     mode="bilinear", align_corners=False)[0, 0] for p in parts])
    return torch.exp(torch.log(ups.clamp(min=1e-6)).mean(0)).numpy()


def frame_map(data: dict, config, framing, index: int, rule: str, sigma: float, stats, prefix: str = "t") -> np.ndarray:
    """Test image ``index``'s frame map (``prefix`` "c": calibration image ``index``'s leave-one-out map)."""
    count = len(framing.tiles)
    layer_maps = [np.asarray(data[f"{prefix}_{layer}"][index], dtype=np.float32) for layer in config.layers]
    tiles = [combine([m[t * (m.shape[0] // count):(t + 1) * (m.shape[0] // count)] for m in layer_maps],
                     framing.tile_size, rule, stats) for t in range(count)]
    return smooth(framing.blend(tiles), sigma)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", help="MVTec-layout folder (repeatable); default: the shared sets")
    parser.add_argument("--config", default=f"{ROOT}/configs/default.yaml", help="config[:key=value,...]")
    parser.add_argument("--sigma", action="append", type=float, help="repeatable; default 4, 3, 2, 1")
    parser.add_argument("--combine", action="append", choices=("mean", "geometric", "standardised"),
                        help="repeatable; default mean")
    parser.add_argument("--edge-band", action="append", type=int, help="repeatable; default 0 (frame pixels)")
    parser.add_argument("--calibration", type=int, default=100)
    parser.add_argument("--cache", default="/tmp/spade-image-decision")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sets = [Path(d) for d in args.data] if args.data else [image_decision.SHARED / s for s in image_decision.SETS
                                                            if (image_decision.SHARED / s).exists()]
    print("| set | combine | sigma | edge band | pixel ROCAUC | PRO |")
    print("|---|---|---|---|---|---|")
    for root in sets:
        data = image_decision.run_set(root, args.config, args.calibration, cache)
        config = data["config"]
        data = image_decision.pixel_view(data, config.layers)  # with a local search, its maps (the score maps')
        if config.frame_from_gallery:
            config = config.replace(frame_size=tuple(int(v) for v in data["frame_size"]))
        framing = framing_for(config)
        stats = [(float(data[f"c_{layer}"].mean()), float(data[f"c_{layer}"].std())) for layer in config.layers]
        sizes = [tuple(int(v) for v in size) for size in data["sizes"]]
        masks = [image_decision._mask(root, Path(p), size) for p, size in zip(data["paths"], sizes)]
        truth = np.concatenate([m.ravel() for m in masks])
        interior = framing.interior_distance()
        for rule in args.combine or ["mean"]:
            for sigma in args.sigma or [4.0, 3.0, 2.0, 1.0]:
                frames = [frame_map(data, config, framing, i, rule, sigma, stats) for i in range(len(sizes))]
                normal = position_baseline(np.stack([frame_map(data, config, framing, i, rule, sigma, stats, "c")
                                                     for i in range(len(data[f"c_{config.layers[0]}"]))]))
                baseline = baseline_map(normal, framing.size)
                for band in args.edge_band or [0]:
                    excess = edge_excess(baseline, interior, band)
                    maps = [framing.to_original(m - excess, size) for m, size in zip(frames, sizes)]
                    pixel = auroc(truth, np.concatenate([m.ravel() for m in maps]))
                    print(f"| {root.name} | {rule} | {sigma:g} | {band} | {pixel:.4f} | {pro_auc(masks, maps):.4f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
