"""Which terms of the combined image decision separate defects on a gallery's product: measured on synthetic defects.

``combined_residual`` sums three standardised terms (the map's rise above the normal frames at the same place, the
patch bank's maximum, the global embedding's kNN distance), and on the four shared sets each term's worth differs by
product: the bank term separates a tyre's defects (image ROCAUC 0.83) and barely a commutator's (0.69), the kNN term
the reverse, and a term that does not separate adds only noise to the sum. At `fit`, gallery images with a synthetic
defect drawn on them (`spade.scoring.synthetic_defects`) are scored leave-one-out as the calibration images are; each
term's ROCAUC between them and the normal calibration images ranks the terms, and ``combined_selected`` sums the
`SELECTED_TERMS` best. On the four shared sets the synthetic ranking matched the real defects' order of the best and
the worst term (benchmarks/image_decision.py, README "Accuracy").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from spade.config import SpadeConfig
from spade.evaluation.metrics import auroc
from spade.features.framing import framing_for
from spade.index.gallery import Gallery, with_gallery_settings
from spade.io.images import decode_rgb, preprocess
from spade.scoring.batch import score_batch
from spade.scoring.position_baseline import baseline_map, map_residual, position_baseline
from spade.scoring.synthetic_defects import KINDS, synthetic_defect

CANDIDATES = ("map_residual", "bank_max", "knn")  # the terms combined_selected chooses from
SELECTED_TERMS = 2  # of 1, 2 or all 3 on the four shared sets, 2 separated best (README "Accuracy")
SEED = 0


@dataclass
class SyntheticScores:
    """The candidate terms of gallery images with a synthetic defect: their source rows and {term: (m,)}."""

    rows: np.ndarray
    terms: dict[str, np.ndarray]


def synthetic_scores(gallery: Gallery, config: SpadeConfig, normal_maps: np.ndarray, count: int,
                     read: Callable[[str], bytes], extractor: Callable | None = None,
                     progress: Callable[[str], None] = lambda _: None, weights=None) -> SyntheticScores:
    """Up to ``count`` gallery images (seeded choice), each with one synthetic defect (scar and cut-paste in turn, the
    donor another gallery image), through the backbone and scored against the gallery without their source image;
    ``normal_maps``: the calibration images' maps, the position baseline of the residual term. An image that can no
    longer be read is left out (named). ``extractor``: the backbone to use, else one built with ``weights`` (the
    caller's `ResolvedWeights`, so a fit does not resolve and hash the weights file again), else the config's."""
    config = with_gallery_settings(config, gallery.manifest)
    n = gallery.index.ntotal
    if n < 2 or count < 1 or len(normal_maps) < 1:
        return SyntheticScores(np.zeros(0, dtype=np.int64), {term: np.zeros(0) for term in CANDIDATES})
    if extractor is None:
        from spade.features.backbone import FeatureExtractor

        extractor = FeatureExtractor(config, weights)
    framing = framing_for(config)
    rng = np.random.default_rng(SEED)
    sources = np.sort(rng.choice(n, size=min(count, n), replace=False))
    uris = gallery.images.column("uri").to_pylist()
    baseline = baseline_map(position_baseline(normal_maps), framing.size)
    single = config.replace(image_score="bank_max", map_edge_band=0)  # the map residual compares the method's maps
    rows, found = [], {term: [] for term in CANDIDATES}

    def image(row: int) -> np.ndarray | None:
        try:
            return decode_rgb(read(uris[row]))
        except Exception as exc:  # a gallery image moved or damaged since fit read it: one fewer synthetic image
            progress(f"synthetic defects: {uris[row]} left out ({exc})")
            return None

    for start in range(0, len(sources), config.batch_size):
        batch, tensors = [], []
        for i, row in enumerate(sources[start:start + config.batch_size], start):
            kind = KINDS[i % len(KINDS)]
            rgb = image(int(row))
            donor = image(int((row + n // 2) % n)) if kind == "cut_paste" and rgb is not None else rgb  # a scar needs none
            if rgb is None or donor is None:
                continue
            defective, _ = synthetic_defect(rgb, donor, kind, rng)
            tensors.append(preprocess(defective, config.resize, config.crop, config.mean, config.std, framing,
                                      config.brightness))
            batch.append(int(row))
        if not batch:
            continue
        features = extractor(torch.stack(tensors))
        for row, result in zip(batch, score_batch(features, gallery, single, exclude_rows=np.asarray(batch))):
            rows.append(row)
            found["knn"].append(result.knn_score)
            found["bank_max"].append(result.bank_max)
            found["map_residual"].append(map_residual(result.term_map, baseline))
        progress(f"synthetic defects: {len(rows)}/{len(sources)} gallery images with a drawn defect scored")
    return SyntheticScores(np.asarray(rows, dtype=np.int64), {term: np.asarray(v, np.float64) for term, v in found.items()})


def select_terms(normal: dict[str, np.ndarray], synthetic: SyntheticScores, count: int = SELECTED_TERMS) -> dict[str, Any]:
    """The manifest's record: {"images", "auroc": {term: ROCAUC of synthetic against normal}, "terms": the ``count``
    best, in `CANDIDATES` order}. With fewer than 2 synthetic images every candidate is kept (``combined_residual``)."""
    images = int(len(synthetic.rows))
    if images < 2:
        return {"images": images, "auroc": {}, "terms": list(CANDIDATES)}
    labels = np.r_[np.zeros(len(normal["knn"]), dtype=bool), np.ones(images, dtype=bool)]
    scores = {term: auroc(labels, np.r_[normal[term], synthetic.terms[term]]) for term in CANDIDATES}
    best = sorted(CANDIDATES, key=lambda term: (-scores[term], CANDIDATES.index(term)))[:count]
    return {"images": images, "auroc": {term: round(v, 6) for term, v in scores.items()},
            "terms": [term for term in CANDIDATES if term in best]}
