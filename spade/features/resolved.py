"""What a weights lookup yields (`ResolvedWeights`) and its errors, shared by the weights resolver and the
offline package loaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class WeightsUnavailable(RuntimeError):
    """No usable weights were found; the message lists how to supply them."""


class PreprocessingMismatch(ValueError):
    """The config's mean/std differ from the normalisation the weights were trained (or re-calibrated) with."""


@dataclass(frozen=True)
class ResolvedWeights:
    """A backbone state dict and where it came from.

    ``mean``/``std``, when set, are the input normalisation these weights only work with
    (e.g. ResMem's ResNet-152 re-estimated its BatchNorm statistics on un-normalised [0, 1]
    inputs); None means the usual ImageNet normalisation is fine.
    """

    source: str
    sha256: str
    state_dict: dict[str, torch.Tensor] | None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def is_random(self) -> bool:
        return self.state_dict is None


def check_preprocessing(weights: ResolvedWeights, mean, std, config_name: str = "the config") -> None:
    """Raise `PreprocessingMismatch`, naming the fix, when ``mean``/``std`` differ from what ``weights`` need."""
    for key, need, have in (("mean", weights.mean, mean), ("std", weights.std, std)):
        if need is None:
            continue
        have = tuple(float(v) for v in have)
        if len(have) != len(need) or any(abs(a - b) > 1e-6 for a, b in zip(have, need)):
            raise PreprocessingMismatch(
                f"weights {weights.source} need input normalisation mean={list(weights.mean)}, std={list(weights.std)} "
                f"but {config_name} has {key}={list(have)}. Fix: set `mean: {list(weights.mean)}` and "
                f"`std: {list(weights.std)}` in the config (features computed otherwise are meaningless)."
            )
