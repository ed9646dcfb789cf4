"""Framings and image-score rules compared on real MVTec-layout sets, from one cached pass of the method.

    python benchmarks/image_decision.py                       # the four shared sets, framings full / aspect / tiles
    python benchmarks/image_decision.py --data ../shared/data/mvtec3d_tire --framing tiles --framing aspect

For each set and framing it runs the method itself (no Beam: `spade` functions on arrays) once: features of the
gallery (train/good) and test images, the kNN term and each layer's raw correspondence map of every test image
and of up to ``--calibration`` gallery images scored leave-one-out. These are cached (``--cache``), so each
image-score rule below costs no scoring. Printed: image ROCAUC of every rule, pixel ROCAUC and PRO (full image; of
the method's maps, without the config's ``map_edge_band``: `map_rules.py --edge-band` applies it; with
``approximate_local_radius`` the rules read the bank's maps and the pixel columns the local search's, as
`spade.scoring.batch` does), and for every
rule the good flagged / defective missed at the calibrated threshold (mean + 1.645 std of the leave-one-out normal
scores, the default's 5 % target), and the fewest defective images any threshold misses while flagging at most 10 % of
the good ones (issue 21's bar): where that is above a miss-rate bar, no calibration can meet it with that rule.
``--threshold-rules RULE`` (repeatable) adds a second table: that image-score rule's good flagged / defective missed
under each way of setting its threshold from the same leave-one-out normal scores (`THRESHOLD_RULES`: the default's
mean + 1.645 std, empirical quantiles, a median/MAD rule, a 10 % target).

Rules (each a function of a frame's kNN term and its raw per-layer maps):

* ``knn``: the paper's; ``map_max``: maximum of the smoothed, layer-averaged map (PatchCore, PaDiM);
* ``combined``: z(knn) + z(map_max), z standardised on the leave-one-out normal images;
* ``topk_mean``: mean of the smoothed map's top 1 % of positions (a defect's area, not one hot pixel);
* ``layer_max``: per layer, the maximum of its smoothed map, each standardised, then the largest;
* ``layer_sum``: the same per-layer maxima standardised and summed;
* ``combined_topk``: z(knn) + z(topk_mean); ``combined3``: z(knn) + z(map_max) + z(topk_mean);
* ``bank_max``: PatchCore's, a frame's largest distance to the global coreset bank of its layer2+3 patch
  features (`spade.index.patch_bank`, the config's ``bank_layers`` and ``bank_ratio``); ``combined_bank``:
  z(topk_mean) + z(bank_max); ``knn+bank``: z(knn) + z(bank_max);
* ``top01_mean``: the smoothed map's top 0.1 % (a thin crack's area); ``combined_bank01``: z(top01_mean) +
  z(bank_max); ``knn+top+bank``: z(knn) + z(topk_mean) + z(bank_max);
* ``map_residual``: the top 0.1 % of the map minus the calibration images' mean map at each place (on the 8-pixel
  grid the gallery records; each calibration image against the others' mean), `spade.scoring.position_baseline`;
  ``combined_residual``: z(map_residual) + z(bank_max) + z(knn); ``residual+bank``, ``residual+knn``;
* ``region_excess``: the largest connected region of that residual above the level normal frames' residuals reach at
  1 pixel in 200, its summed excess (log), the frame's 16-pixel border left out (`spade.scoring.region_excess`);
  ``combined_region``: z(map_residual) + z(region_excess) + z(bank_max) + z(knn); ``max(residual,region)+bank+knn``: the
  map's two terms counted once, by the larger; ``residual_or_region``: the larger of ``combined_residual`` and
  ``region_excess``, each standardised by its scores on the normal images (`spade.scoring.image_score`);
* ``combined_selected``: the two of those three terms that best separate ``--synthetic`` gallery images with a drawn
  defect from the leave-one-out normal images (`spade.scoring.term_selection`, as `spade fit` selects them); each
  set's selection and every term's synthetic ROCAUC are printed under the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spade.config import load_config, stable_hash  # noqa: E402
from spade.io.listing import fix_brightness  # noqa: E402
from spade.evaluation.metrics import auroc, pro_auc  # noqa: E402
from spade.features.backbone import FeatureExtractor  # noqa: E402
from spade.features.framing import frame_size_for, framing_for  # noqa: E402
from spade.index.gallery import Gallery  # noqa: E402
from spade.index.knn import build_index, image_scores, nearest_images  # noqa: E402
from spade.index.patch_bank import bank_maxima, build_patch_bank, patch_bank_settings  # noqa: E402
from spade.io.images import decode_rgb, preprocess  # noqa: E402
from spade.scoring.batch import layer_distance_maps  # noqa: E402
from spade.scoring.calibration import image_threshold  # noqa: E402
from spade.scoring.correspondence import configure_threads  # noqa: E402
from spade.scoring.position_baseline import baseline_map, leave_one_out_residuals, map_residual, position_baseline  # noqa: E402
from spade.scoring.region_excess import region_excess, region_record  # noqa: E402
from spade.scoring.term_selection import CANDIDATES, SyntheticScores, select_terms, synthetic_scores  # noqa: E402
from spade.scoring.scoremap import combine_layer_maps, smooth  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
GOOD_FLAGGED_BAR = 0.10  # issue 21: at most 10 % of good images flagged
SETS = ("mvtec_ad_bottle", "mpdd_metal_plate", "mvtec3d_tire", "kolektorsdd_commutator")
SUFFIXES = (".png", ".jpg", ".bmp", ".tif", ".tiff", ".jpeg")
Z = 1.6448536269514722


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def _mask(root: Path, path: Path, size: tuple[int, int]) -> np.ndarray:
    label = path.parent.name
    if label == "good":
        return np.zeros((size[1], size[0]), dtype=bool)
    found = root / "ground_truth" / label / f"{path.stem}_mask.png"
    return np.asarray(Image.open(found).convert("L")) > 127


def _extract(paths: list[Path], extractor: FeatureExtractor, framing, config) -> tuple[np.ndarray, dict, list]:
    embeddings, pyramids, sizes = [], {layer: [] for layer in config.layers}, []
    for start in range(0, len(paths), config.batch_size):
        rgbs = [decode_rgb(p.read_bytes()) for p in paths[start:start + config.batch_size]]
        sizes += [(rgb.shape[1], rgb.shape[0]) for rgb in rgbs]
        batch = torch.stack([preprocess(rgb, config.resize, config.crop, config.mean, config.std, framing, config.brightness)
                             for rgb in rgbs])
        features = extractor(batch)
        embeddings.append(features.embedding)
        for layer in config.layers:
            pyramids[layer].append(features.pyramid[layer])
    return np.concatenate(embeddings), {k: np.concatenate(v) for k, v in pyramids.items()}, sizes


def _rows(pyramid: dict) -> dict:
    """{layer: (B, C, H, W)} -> {layer: (B, H*W, C)} gallery rows."""
    return {k: np.ascontiguousarray(v.reshape(v.shape[0], v.shape[1], -1).transpose(0, 2, 1)) for k, v in pyramid.items()}


def _score(gallery: Gallery, embedding: np.ndarray, pyramid: dict, config, exclude: np.ndarray | None = None):
    """(kNN terms, the layer maps the image terms read, the pixel maps of the layers where those differ)."""
    knn, maps, pixel = [], {layer: [] for layer in config.layers}, {layer: [] for layer in config.layers}
    for start in range(0, len(embedding), config.batch_size):
        sl = slice(start, start + config.batch_size)
        ex = None if exclude is None else exclude[sl]
        distances, rows = nearest_images(gallery.index, embedding[sl], config.k, exclude_rows=ex)
        knn.append(image_scores(distances))
        part = layer_distance_maps({k: v[sl] for k, v in pyramid.items()}, gallery, rows, config, exclude_rows=ex)
        for layer in config.layers:
            maps[layer].append(part.terms[layer])
            if part.terms[layer] is not part.pixel[layer]:
                pixel[layer].append(part.pixel[layer])
    return (np.concatenate(knn), {k: np.concatenate(v) for k, v in maps.items()},
            {k: np.concatenate(v) for k, v in pixel.items() if v})


def run_set(root: Path, spec: str, calibration: int, cache: Path, synthetic: int = 0) -> dict:
    path, _, overrides = spec.partition(":")
    values = dict(item.split("=", 1) for item in filter(None, overrides.split(",")))
    import yaml
    config = fix_brightness(load_config(path, {k: yaml.safe_load(v) for k, v in values.items()}), str(root))[0]
    name = f"{root.name}-{Path(path).stem}-{stable_hash(config.to_dict())[:12]}"  # a cache per config's values
    if config.approximate_local_radius:
        name += "-bankterms"  # the image terms on the bank's maps (spade.scoring.batch); earlier caches held one kind
    target = cache / f"{name}-synthetic{synthetic}.npz"
    if target.exists():
        return dict(np.load(target, allow_pickle=True)) | {"config": config}
    started = time.perf_counter()
    train, test = _images(root / "train" / "good"), _images(root / "test")
    if config.frame_from_gallery and config.frame_size is None:
        sizes = [Image.open(p).size for p in train[:64]]
        config = config.replace(frame_size=frame_size_for(sizes, config.resize))
    framing = framing_for(config)
    extractor = FeatureExtractor(config)
    g_emb, g_pyr, _ = _extract(train, extractor, framing, config)
    gallery = Gallery(str(root), {"feature_signature": config.feature_signature()}, None, build_index(g_emb), _rows(g_pyr))
    t_emb, t_pyr, t_sizes = _extract(test, extractor, framing, config)
    fitted = time.perf_counter()
    t_knn, t_maps, t_pixel = _score(gallery, t_emb, t_pyr, config)
    scored = time.perf_counter()
    rows = np.unique(np.linspace(0, len(train) - 1, num=min(calibration, len(train))).round().astype(np.int64))
    c_knn, c_maps, c_pixel = _score(gallery, g_emb[rows], {k: v[rows] for k, v in g_pyr.items()}, config, exclude=rows)
    bank = build_patch_bank(gallery.pyramid, framing, patch_bank_settings(config))
    tiles = len(framing.tiles)
    t_bank = np.concatenate([bank_maxima({k: t_pyr[k][s:s + 16] for k in config.bank_layers}, bank, config.bank_layers, tiles)
                             for s in range(0, len(test), 16)])
    c_bank = np.concatenate([bank_maxima({k: g_pyr[k][rows[s:s + 16]] for k in config.bank_layers}, bank, config.bank_layers,
                                         tiles, exclude_rows=rows[s:s + 16]) for s in range(0, len(rows), 16)])
    out = {"t_knn": t_knn, "c_knn": c_knn, "t_bank_max": t_bank, "c_bank_max": c_bank, "labels": np.array([p.parent.name != "good" for p in test]),
           "paths": np.array([str(p) for p in test]), "sizes": np.array(t_sizes),
           "frame_size": np.array(framing.size), "seconds": np.array([fitted - started, scored - fitted])}
    for layer in config.layers:
        out[f"t_{layer}"], out[f"c_{layer}"] = t_maps[layer], c_maps[layer]
    out |= {f"tp_{layer}": maps for layer, maps in t_pixel.items()} | {f"cp_{layer}": maps for layer, maps in c_pixel.items()}
    if synthetic:
        import pyarrow as pa
        gallery.images = pa.table({"uri": [str(p) for p in train]})
        normal_maps = np.stack(frame_maps(out, config, "c")[0])
        found = synthetic_scores(gallery, config, normal_maps, synthetic, lambda uri: Path(uri).read_bytes(), extractor)
        out |= {f"s_{term}": values for term, values in found.terms.items()} | {"s_rows": found.rows}
    np.savez(target, **out)
    return out | {"config": config}


def pixel_view(data: dict, layers) -> dict:
    """``data`` with each layer's pixel maps (``tp_``, ``cp_``: a local search's) in place of the maps the image terms
    read (``t_``, ``c_``), where they differ: what the score maps and their pixel metrics are made of."""
    return data | {f"{prefix}_{layer}": data[f"{prefix}p_{layer}"] for prefix in ("t", "c") for layer in layers
                   if f"{prefix}p_{layer}" in data}


def frame_maps(data: dict, config, prefix: str) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Smoothed layer-averaged frame maps and each layer's own smoothed maxima."""
    config = config.replace(frame_size=tuple(int(v) for v in data["frame_size"])) if config.frame_from_gallery else config
    framing = framing_for(config)
    count = len(framing.tiles)
    finished, per_layer = [], {layer: [] for layer in config.layers}
    n = len(data[f"{prefix}_{config.layers[0]}"])
    for i in range(n):
        layer_maps = [data[f"{prefix}_{layer}"][i] for layer in config.layers]
        tiles = []
        for t in range(count):
            parts = [m[t * (m.shape[0] // count):(t + 1) * (m.shape[0] // count)] for m in layer_maps]
            tiles.append(combine_layer_maps(parts, framing.tile_size))
        finished.append(smooth(framing.blend(tiles), config.sigma))
        for layer, m in zip(config.layers, layer_maps):
            per_layer[layer].append(float(smooth(np.asarray(m, np.float32), config.sigma / (framing.tile_size[0] / m.shape[1])).max()))
    return finished, {k: np.asarray(v) for k, v in per_layer.items()}


def terms(data: dict, config, prefix: str) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    maps, layer_max = frame_maps(data, config, prefix)
    out = {"knn": np.asarray(data[f"{prefix}_knn"]), "bank_max": np.asarray(data[f"{prefix}_bank_max"]), "map_max": np.array([m.max() for m in maps]),
           "topk_mean": np.array([np.sort(m.ravel())[-max(1, m.size // 100):].mean() for m in maps]),
           "top01_mean": np.array([np.sort(m.ravel())[-max(1, m.size // 1000):].mean() for m in maps])}
    out |= {f"max_{layer}": v for layer, v in layer_max.items()}
    return out, maps


def standardised(test: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(test, normal) scores less the normal scores' mean, over their standard deviation."""
    mean, std = normal.mean(), normal.std(ddof=1)
    return (test - mean) / std, (normal - mean) / std


def larger(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The elementwise larger of two rules' (test, normal) scores."""
    return np.maximum(a[0], b[0]), np.maximum(a[1], b[1])


def rules(test: dict, normal: dict, layers) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{rule: (test scores, normal scores)}."""
    z = {k: standardised(test[k], normal[k]) for k in test}
    add = lambda *names: (sum(z[n][0] for n in names), sum(z[n][1] for n in names))  # noqa: E731
    out = {"knn": (test["knn"], normal["knn"]), "map_max": (test["map_max"], normal["map_max"]),
           "topk_mean": (test["topk_mean"], normal["topk_mean"]), "combined": add("knn", "map_max"),
           "combined_topk": add("knn", "topk_mean"), "combined3": add("knn", "map_max", "topk_mean"),
           "layer_sum": add(*[f"max_{layer}" for layer in layers]),
           "layer_max": (np.max([z[f"max_{layer}"][0] for layer in layers], axis=0),
                         np.max([z[f"max_{layer}"][1] for layer in layers], axis=0))}
    out["knn+layer_sum"] = (out["layer_sum"][0] + z["knn"][0], out["layer_sum"][1] + z["knn"][1])
    out |= {"bank_max": (test["bank_max"], normal["bank_max"]), "combined_bank": add("topk_mean", "bank_max"),
            "knn+bank": add("knn", "bank_max"), "top01_mean": (test["top01_mean"], normal["top01_mean"]),
            "combined_bank01": add("top01_mean", "bank_max"), "knn+top+bank": add("knn", "topk_mean", "bank_max")}
    if "map_residual" in test:  # above the normal frames' mean map by place (spade.scoring.position_baseline)
        out |= {"map_residual": (test["map_residual"], normal["map_residual"]),
                "combined_residual": add("map_residual", "bank_max", "knn"), "residual+bank": add("map_residual", "bank_max"),
                "residual+knn": add("map_residual", "knn")}
    if "region_excess" in test:  # the residual's largest region above normal (spade.scoring.region_excess)
        out |= {"region_excess": (test["region_excess"], normal["region_excess"]),
                "combined_region": add("map_residual", "region_excess", "bank_max", "knn"),
                "max(residual,region)+bank+knn": tuple(m + b for m, b in zip(larger(z["map_residual"], z["region_excess"]),
                                                                             add("bank_max", "knn")))}
        # combined_residual standardised again on the normals, against region_excess's standardised term
        out["residual_or_region"] = larger(standardised(*add("map_residual", "bank_max", "knn")), z["region_excess"])
    if "selected_terms" in normal:
        out["combined_selected"] = add(*normal["selected_terms"])
    return out


def _mad_sigma(values: np.ndarray) -> float:
    """The normal distribution's standard deviation estimated from the median absolute deviation."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


# ways to set an image threshold from leave-one-out normal scores (`--threshold-rules`)
THRESHOLD_RULES = {
    "mean + 1.645 std (default)": lambda n: image_threshold(n, 0.05, 0.0),  # what `spade fit` calibrates
    "0.95 quantile": lambda n: float(np.quantile(n, 0.95)),
    "0.90 quantile": lambda n: float(np.quantile(n, 0.90)),
    "median + 1.645 MAD-sigma": lambda n: float(np.median(n)) + Z * _mad_sigma(n),
    "mean + 1.282 std (10 % target)": lambda n: image_threshold(n, 0.10, 0.0),
}


def threshold_rows(name: str, rule: str, scores: np.ndarray, normals: np.ndarray, labels: np.ndarray) -> list[str]:
    """Markdown rows: ``rule``'s good flagged / defective missed under each of `THRESHOLD_RULES`."""
    rows = []
    for label, threshold_of in THRESHOLD_RULES.items():
        flagged = scores > threshold_of(np.asarray(normals, dtype=np.float64))
        rows.append(f"| {name} | {rule} | {label} | {int(flagged[~labels].sum())}/{int((~labels).sum())} | "
                    f"{int((~flagged[labels]).sum())}/{int(labels.sum())} |")
    return rows


def fewest_missed(scores: np.ndarray, labels: np.ndarray, flagged_share: float) -> int:
    """The fewest defective images any threshold misses while flagging at most ``flagged_share`` of the good ones:
    whether a miss-rate bar can be met by a threshold at all, or needs a rule that separates better."""
    good = np.sort(scores[~labels])[::-1]
    allowed = int(np.floor(flagged_share * len(good)))
    threshold = good[allowed] if allowed < len(good) else -np.inf  # flag only what lies above the (allowed+1)-th good
    return int((scores[labels] <= threshold).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", help="MVTec-layout folder (repeatable); default: the shared sets")
    parser.add_argument("--config", action="append", help="config[:key=value,...] (repeatable); default: "
                        "configs/default.yaml with framing full, aspect and tiles")
    parser.add_argument("--calibration", type=int, default=100)
    parser.add_argument("--synthetic", type=int, default=120, help="gallery images with a drawn defect for "
                        "combined_selected (0: no such rule)")
    parser.add_argument("--cache", default="/tmp/spade-image-decision")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-pixel", action="store_true", help="skip pixel ROCAUC / PRO")
    parser.add_argument("--threshold-rules", action="append", default=[], metavar="RULE",
                        help="an image-score rule (e.g. residual_or_region) to re-threshold by every THRESHOLD_RULES "
                             "entry (repeatable): a second table")
    args = parser.parse_args(argv)
    configure_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sets = [Path(d) for d in args.data] if args.data else [SHARED / s for s in SETS if (SHARED / s).exists()]
    specs = args.config or [f"{ROOT}/configs/default.yaml:framing={f}" for f in ("full", "aspect", "tiles")]
    print("| set | config | frame | rule | image ROCAUC | good flagged | defective missed | fewest missed, <= 10 % flagged | "
          "pixel ROCAUC | PRO | fit s | score s/img |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    selections, rethresholded = [], []
    for root in sets:
        for spec in specs:
            data = run_set(root, spec, args.calibration, cache, args.synthetic)
            config = data["config"]
            test, maps = terms(data, config, "t")
            normal, normal_maps = terms(data, config, "c")
            normal_maps = np.stack(normal_maps)
            baseline = baseline_map(position_baseline(normal_maps), maps[0].shape)
            test["map_residual"] = np.array([map_residual(m, baseline) for m in maps])
            normal["map_residual"] = leave_one_out_residuals(normal_maps)
            region, normal["region_excess"] = region_record(normal_maps)
            test["region_excess"] = np.array([region_excess(m - baseline, region["level"], region["border"]) for m in maps])
            if "s_rows" in data:
                found = SyntheticScores(data["s_rows"], {t: data[f"s_{t}"] for t in CANDIDATES})
                selection = select_terms(normal, found)
                normal["selected_terms"] = selection["terms"]
                selections.append(f"{root.name} {spec.rsplit('/', 1)[-1]}: combined_selected = "
                                  f"{' + '.join(selection['terms'])} (synthetic ROCAUC {selection['auroc']})")
            labels = data["labels"].astype(bool)
            pixel = pro = float("nan")
            if not args.no_pixel:
                framing_config = config.replace(frame_size=tuple(int(v) for v in data["frame_size"])) \
                    if config.frame_from_gallery else config
                framing = framing_for(framing_config)
                pixel_maps = frame_maps(pixel_view(data, config.layers), config, "t")[0]
                originals = [framing.to_original(m, tuple(int(v) for v in size))
                             for m, size in zip(pixel_maps, data["sizes"])]
                masks = [_mask(root, Path(p), tuple(int(v) for v in size)) for p, size in zip(data["paths"], data["sizes"])]
                pixel = auroc(np.concatenate([m.ravel() for m in masks]), np.concatenate([o.ravel() for o in originals]))
                pro = pro_auc(masks, originals)
            seconds = data["seconds"]
            frame = "x".join(str(int(v)) for v in data["frame_size"])
            label = spec.rsplit("/", 1)[-1]
            for rule, (scores, normals) in rules(test, normal, config.layers).items():
                if rule in args.threshold_rules:
                    rethresholded += threshold_rows(root.name, rule, scores, normals, labels)
                threshold = THRESHOLD_RULES["mean + 1.645 std (default)"](normals)
                flagged = scores > threshold
                print(f"| {root.name} | {label} | {frame} | {rule} | {auroc(labels, scores):.3f} | "
                      f"{int(flagged[~labels].sum())}/{int((~labels).sum())} | {int((~flagged[labels]).sum())}/{int(labels.sum())} | "
                      f"{fewest_missed(scores, labels, GOOD_FLAGGED_BAR)}/{int(labels.sum())} | "
                      f"{pixel:.3f} | {pro:.3f} | {seconds[0]:.0f} | {seconds[1] / len(labels):.3f} |", flush=True)
    print("\n".join(selections))
    if rethresholded:
        print("\n| set | rule | threshold from the leave-one-out normal scores | good flagged | defective missed |")
        print("|---|---|---|---|---|")
        print("\n".join(rethresholded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
