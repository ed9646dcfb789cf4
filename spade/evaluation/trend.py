"""What changed across nights: per gallery and night, the score distribution and whether it has drifted.

A camera's scores can creep upward for a week (lens dirt, a new batch of material, a moved light) long before
images cross the threshold. Each night of a gallery is summarised (images, errors, flagged share, score quantiles,
and the share of its images above the calibrated normal mean plus 2 standard deviations: about 2.5 % on normal
nights; counted over all scored images, since with the default 5 % rule the image threshold, mean + 1.645 standard
deviations, lies below that level and no unflagged image could exceed it) and tested for drift with the two-sample
Kolmogorov-Smirnov test, warning when p < ``alpha`` and the scores moved up:

* a sudden change: this night against the previous ``window`` nights pooled (a moved light, a new batch);
* a slow drift: the last ``baseline`` nights pooled against the gallery's first ``baseline`` nights (its
  commissioning, after which nothing should change), with an effect floor (KS D >= ``min_effect``: with thousands
  of images a night, a shift too small to matter would otherwise be significant). Pooling nights is what lets a
  drift show before single nights flag more images.

A flagged share above ``flagged_alert`` warns too. ``alpha`` is per test and night (default 0.001: with dozens of
galleries, 0.01 would warn somewhere most nights by chance). A change of gallery (a refit) starts a new history.

The gallery's calibration (the normal images' leave-one-out scores at `fit`) is reported beside them (the share of
the recent nights' scores above its median) but does not warn: leave-one-out scores of gallery images are not
distributed like new normal images' (on the synthetic plant of tests/test_trend.py, 35 % and 77 % of two undrifted
lines' scores lie above it), so a test against it would warn every night on some lines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
from scipy import special

ALPHA = 0.001
MIN_EFFECT = 0.2
BASELINE = 3
WINDOW = 7
FLAGGED_ALERT = 0.10
MIN_IMAGES = 5
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class Reference:
    """A gallery's normal score distribution in the run's image-score mode, and the image threshold it used."""

    mean: float
    std: float
    images: int
    quantiles: tuple[float, ...] | None = None  # evenly spaced probabilities 0..1
    threshold: float | None = None

    @classmethod
    def from_record(cls, normal: dict[str, Any] | None, threshold: float | None) -> "Reference | None":
        if not normal or normal.get("mean") is None or normal.get("std") is None:
            return None
        quantiles = normal.get("quantiles")
        return cls(float(normal["mean"]), float(normal["std"]), int(normal.get("images") or 0),
                   tuple(float(q) for q in quantiles) if quantiles else None, threshold)

    @property
    def median(self) -> float:
        """The normal scores' median (their mean where only mean and standard deviation were recorded)."""
        if self.quantiles:
            return float(np.interp(0.5, np.linspace(0.0, 1.0, len(self.quantiles)), self.quantiles))
        return self.mean


@dataclass(frozen=True)
class Night:
    """One night of one gallery as its score table gives it."""

    day: str
    gallery_hash: str
    scores: np.ndarray  # image scores of the ok rows
    flagged: np.ndarray | None  # is_anomalous of the ok rows (None: no image threshold)
    errors: int


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(D, p) of the two-sample Kolmogorov-Smirnov test, p from the Kolmogorov distribution at the effective size
    n·m/(n+m) (asymptotic: slightly conservative for a few dozen images, and ~50x cheaper than scipy's exact
    `ks_2samp`, which dominated a trend over years of nights)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, grid, side="right") / a.size - np.searchsorted(b, grid, side="right") / b.size)))
    effective = a.size * b.size / (a.size + b.size)
    return d, float(special.kolmogorov(d * np.sqrt(effective)))


def summarise(night: Night, reference: Reference | None) -> dict[str, Any]:
    """The night's row of the trend table (no drift tests: see `assess`)."""
    scores = np.asarray(night.scores, dtype=np.float64)
    flagged = None if night.flagged is None else np.asarray(night.flagged, dtype=bool)
    row: dict[str, Any] = {"day": night.day, "gallery_hash": night.gallery_hash, "images": int(scores.size + night.errors),
                           "ok": int(scores.size), "errors": int(night.errors),
                           "flagged": None if flagged is None else int(flagged.sum()),
                           "flagged_share": None if flagged is None or not scores.size else float(flagged.mean()),
                           "mean": float(scores.mean()) if scores.size else None}
    values = np.quantile(scores, QUANTILES) if scores.size else [None] * len(QUANTILES)
    row |= {f"p{round(q * 100):02d}": (None if v is None else float(v)) for q, v in zip(QUANTILES, values)}
    above = None
    if reference is not None and scores.size:
        above = float(np.mean(scores > reference.mean + 2 * reference.std))
    row["above_normal_2sd"] = above
    return row


def assess(nights: Iterable[Night], references: dict[str, Reference | None], window: int = WINDOW,
           alpha: float = ALPHA, flagged_alert: float = FLAGGED_ALERT, min_images: int = MIN_IMAGES,
           min_effect: float = MIN_EFFECT, baseline: int = BASELINE) -> Iterator[dict[str, Any]]:
    """One row per night, in the order given (a gallery's nights by day), with the drift tests and the warnings
    (``warnings``: a list of short reasons; empty when the night is clear). ``references``: by gallery hash."""
    history: list[np.ndarray] = []
    current = None
    for night in nights:
        if night.gallery_hash != current:
            history, current = [], night.gallery_hash
        reference = references.get(night.gallery_hash)
        row = summarise(night, reference)
        scores = np.asarray(night.scores, dtype=np.float64)
        warnings = []
        row |= {"share_above_median": None, "ks_recent": None, "p_recent": None, "ks_baseline": None,
                "p_baseline": None}
        latest = history + [scores]
        if reference is not None:
            pooled = np.concatenate(latest[-baseline:])
            if pooled.size:
                row["share_above_median"] = float(np.mean(pooled > reference.median))
        previous = np.concatenate(history[-window:]) if history else np.zeros(0)
        if scores.size >= min_images and previous.size >= min_images:
            d, p = ks_two_sample(scores, previous)
            row["ks_recent"], row["p_recent"] = d, p
            if p < alpha and np.median(scores) > np.median(previous):
                warnings.append(f"scores departed from the previous {min(len(history), window)} night(s) "
                                f"(KS D={d:.2f}, p={p:.1e})")
        if len(history) >= baseline:
            first, last = np.concatenate(history[:baseline]), np.concatenate(latest[-baseline:])
            if first.size >= min_images and last.size >= min_images:
                d, p = ks_two_sample(last, first)
                row["ks_baseline"], row["p_baseline"] = d, p
                if p < alpha and d >= min_effect and np.median(last) > np.median(first):
                    warnings.append(f"the last {baseline} nights' scores drifted from the gallery's first {baseline} "
                                    f"(KS D={d:.2f}, p={p:.1e})")
        if row["flagged_share"] is not None and row["flagged_share"] > flagged_alert:
            warnings.append(f"flagged share {row['flagged_share']:.0%} above {flagged_alert:.0%}")
        row["warnings"] = warnings
        yield row
        if scores.size:
            history.append(scores)
            del history[baseline:-window]  # keep the baseline nights and the last `window`
