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

import functools
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
    quantiles: tuple[float, ...] | None = None  # evenly spaced probabilities 0..1
    threshold: float | None = None

    @classmethod
    def from_record(cls, normal: dict[str, Any] | None, threshold: float | None) -> "Reference | None":
        if not normal or normal.get("mean") is None or normal.get("std") is None:
            return None
        quantiles = normal.get("quantiles")
        return cls(float(normal["mean"]), float(normal["std"]), tuple(float(q) for q in quantiles) if quantiles else None,
                   threshold)

    @functools.cached_property
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
    """(D, p) of the two-sample Kolmogorov-Smirnov test of sorted samples ``a`` and ``b``, p from the Kolmogorov
    distribution at the effective size n·m/(n+m) (asymptotic: slightly conservative for a few dozen images, and
    ~50x cheaper than scipy's exact `ks_2samp`, which dominated a trend over years of nights)."""
    grid = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, grid, side="right") / a.size - np.searchsorted(b, grid, side="right") / b.size)))
    effective = a.size * b.size / (a.size + b.size)
    return d, float(special.kolmogorov(d * np.sqrt(effective)))


def _quantiles(ordered: np.ndarray, probabilities: Iterable[float]) -> list[float]:
    """Linear-interpolation quantiles (numpy's default) of a sorted, non-empty sample."""
    position = np.asarray(list(probabilities)) * (ordered.size - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, ordered.size - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)).tolist()


def _pooled(samples: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(samples)) if samples else np.zeros(0)


def summarise(night: Night, reference: Reference | None, ordered: np.ndarray | None = None) -> dict[str, Any]:
    """The night's row of the trend table (no drift tests: see `assess`); ``ordered``: its scores sorted, if known."""
    ordered = np.sort(np.asarray(night.scores, dtype=np.float64)) if ordered is None else ordered
    n = ordered.size
    flagged = None if night.flagged is None else np.asarray(night.flagged, dtype=bool)
    row: dict[str, Any] = {"day": night.day, "gallery_hash": night.gallery_hash, "images": int(n + night.errors),
                           "ok": int(n), "errors": int(night.errors),
                           "flagged": None if flagged is None else int(flagged.sum()),
                           "flagged_share": None if flagged is None or not n else float(flagged.sum() / n),
                           "mean": float(ordered.sum() / n) if n else None}
    values = _quantiles(ordered, QUANTILES) if n else [None] * len(QUANTILES)
    row |= {f"p{round(q * 100):02d}": v for q, v in zip(QUANTILES, values)}
    above = None
    if reference is not None and n:
        above = float(n - np.searchsorted(ordered, reference.mean + 2 * reference.std, side="right")) / n
    row["above_normal_2sd"] = above
    return row


@dataclass(frozen=True)
class DriftRule:
    """When a night warns (the module's docstring: the two KS tests, their effect floor, the flagged share) and how
    much history each test pools; `spade trend`'s options, recorded in its verdict as ``settings``."""

    window: int = WINDOW
    alpha: float = ALPHA
    flagged_alert: float = FLAGGED_ALERT
    min_images: int = MIN_IMAGES
    min_effect: float = MIN_EFFECT
    baseline: int = BASELINE


def assess(nights: Iterable[Night], references: dict[str, Reference | None],
           rule: DriftRule = DriftRule()) -> Iterator[dict[str, Any]]:
    """One row per night, in the order given (a gallery's nights by day), with the drift tests and the warnings
    (``warnings``: a list of short reasons; empty when the night is clear). ``references``: by gallery hash."""
    window, alpha, flagged_alert = rule.window, rule.alpha, rule.flagged_alert
    min_images, min_effect, baseline = rule.min_images, rule.min_effect, rule.baseline
    history: list[np.ndarray] = []  # sorted scores of the gallery's first `baseline` nights and its last `window`
    first: np.ndarray | None = None
    current = None
    for night in nights:
        if night.gallery_hash != current:
            history, first, current = [], None, night.gallery_hash
        reference = references.get(night.gallery_hash)
        ordered = np.sort(np.asarray(night.scores, dtype=np.float64))
        row = summarise(night, reference, ordered)
        warnings = []
        row |= {"share_above_median": None, "ks_recent": None, "p_recent": None, "ks_baseline": None,
                "p_baseline": None}
        last = _pooled((history + [ordered])[-baseline:])
        if reference is not None and last.size:
            row["share_above_median"] = float(last.size - np.searchsorted(last, reference.median, side="right")) / last.size
        previous = _pooled(history[-window:])
        if ordered.size >= min_images and previous.size >= min_images:
            d, p = ks_two_sample(ordered, previous)
            row["ks_recent"], row["p_recent"] = d, p
            if p < alpha and _quantiles(ordered, [0.5])[0] > _quantiles(previous, [0.5])[0]:
                warnings.append(f"scores departed from the previous {min(len(history), window)} night(s) "
                                f"(KS D={d:.2f}, p={p:.1e})")
        if len(history) >= baseline:
            first = _pooled(history[:baseline]) if first is None else first
            if first.size >= min_images and last.size >= min_images:
                d, p = ks_two_sample(last, first)
                row["ks_baseline"], row["p_baseline"] = d, p
                if p < alpha and d >= min_effect and _quantiles(last, [0.5])[0] > _quantiles(first, [0.5])[0]:
                    warnings.append(f"the last {baseline} nights' scores drifted from the gallery's first {baseline} "
                                    f"(KS D={d:.2f}, p={p:.1e})")
        if row["flagged_share"] is not None and row["flagged_share"] > flagged_alert:
            warnings.append(f"flagged share {row['flagged_share']:.0%} above {flagged_alert:.0%}")
        row["warnings"] = warnings
        yield row
        if ordered.size:
            history.append(ordered)
            del history[baseline:-window]  # keep the baseline nights and the last `window`
