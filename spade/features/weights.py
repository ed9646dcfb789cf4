"""Finding backbone weights without a model hub: explicit file, torchvision cache, offline package, or random.

The resolved source is recorded (name + sha256) in the gallery manifest, so a
score run can prove it uses the same features as the fit run.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
from typing import Callable

import fsspec
import torch
import torchvision

from spade.features.offline_weights import PACKAGE_LOADERS
from spade.features.resolved import (  # noqa: F401  (re-exported: callers import them from here)
    PreprocessingMismatch, ResolvedWeights, WeightsUnavailable, check_preprocessing)

LOG = logging.getLogger(__name__)

WEIGHTS_ENV = "SPADE_WEIGHTS"


def _offline_hint(backbone: str) -> str:
    """What the registered offline packages offer, for error messages."""
    serving = [loader for loader in _OFFLINE_LOADERS if backbone in getattr(loader, "backbones", ())]
    if serving:
        return "install an offline weights package for it: " + "; ".join(
            getattr(loader, "install_hint", repr(loader)) for loader in serving)
    offers = [f"{getattr(loader, 'install_hint', repr(loader))} [backbone {', '.join(getattr(loader, 'backbones', ('?',)))}]"
              for loader in _OFFLINE_LOADERS]
    if not offers:
        return "no offline weights package is known"
    return (f"no offline weights package carries {backbone}; switch `backbone:` to one that has one: " + "; ".join(offers))


def _how_to_supply(backbone: str) -> str:
    ways = [
        f"set `weights: /path/to/{backbone}.pth` in the config (or --weights, or the {WEIGHTS_ENV} "
        "environment variable) to a state-dict file copied from a connected machine"
    ]
    if backbone in torchvision.models.list_models():
        ways.append(
            "on a connected machine run once `python -c \"import torchvision; "
            f"torchvision.models.get_model('{backbone}', weights='DEFAULT')\"` to fill $TORCH_HOME, then copy "
            "that cache (or use `weights: imagenet` where the download URL is reachable)"
        )
    ways.append(_offline_hint(backbone) + " (see README, 'Weights')")
    ways.append("`weights: random` for plumbing tests only")
    return f"Supply ImageNet weights for {backbone} in one of these ways: " + "; ".join(
        f"({i}) {way}" for i, way in enumerate(ways, 1)) + "."


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailable(f"{source}: not a state dict (expected a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_file(url: str) -> ResolvedWeights:
    """Read a state dict or torchvision checkpoint from a local path or fsspec URL."""
    try:
        with fsspec.open(url, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise WeightsUnavailable(f"weights file not found: {url}; check the path in `weights:` or {WEIGHTS_ENV}") from None
    if url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(data)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsUnavailable(f"{url}: cannot read as a torch checkpoint ({exc})") from None
    return ResolvedWeights(source=url, sha256=_sha256(data), state_dict=_unwrap_state_dict(state, url))


def _torchvision_weights(backbone: str):
    try:
        return torchvision.models.get_model_weights(backbone).DEFAULT
    except (ValueError, KeyError):
        raise WeightsUnavailable(
            f"torchvision knows no pretrained weights for backbone {backbone!r}, so `weights: imagenet` cannot "
            "apply to it. " + _how_to_supply(backbone)
        ) from None


def _torchvision_cache_path(backbone: str) -> str:
    weights = _torchvision_weights(backbone)
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _torchvision_cached(backbone: str) -> bool:
    """True when torchvision's own weights for ``backbone`` are in $TORCH_HOME (False for non-torchvision models)."""
    try:
        return os.path.exists(_torchvision_cache_path(backbone))
    except WeightsUnavailable:
        return False


def load_torchvision_imagenet(backbone: str, allow_download: bool = True) -> ResolvedWeights:
    """torchvision's own ImageNet weights, from $TORCH_HOME or (if allowed and reachable) its download URL."""
    path = _torchvision_cache_path(backbone)
    if not os.path.exists(path):
        if not allow_download:
            raise WeightsUnavailable(f"{path} is not in the torchvision cache. " + _how_to_supply(backbone))
        weights = _torchvision_weights(backbone)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            torch.hub.download_url_to_file(weights.url, path, progress=False)
        except Exception as exc:
            raise WeightsUnavailable(
                f"could not download {weights.url} ({exc.__class__.__name__}: {exc}); this machine seems offline. "
                + _how_to_supply(backbone)
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    resolved = load_weights_file(path)
    return ResolvedWeights(source=f"torchvision:{_torchvision_weights(backbone)}", sha256=resolved.sha256, state_dict=resolved.state_dict)


OfflineLoader = Callable[[str], "ResolvedWeights | None"]
_OFFLINE_LOADERS: list[OfflineLoader] = list(PACKAGE_LOADERS)
_NAMED_OFFLINE_LOADERS: dict[str, OfflineLoader] = {loader.spec: loader for loader in PACKAGE_LOADERS}


def register_offline_loader(loader: OfflineLoader, spec: str | None = None) -> OfflineLoader:
    """Register a function that returns weights for a backbone from an installed package, or None.

    With ``spec``, `weights: <spec>` in a config asks for this loader explicitly. A loader may
    carry ``backbones`` (names it serves), ``install_hint`` (text for error messages) and
    ``unavailable_reason(backbone) -> str`` (why it returned None), all optional.
    """
    if loader not in _OFFLINE_LOADERS:
        _OFFLINE_LOADERS.append(loader)
    if spec is not None:
        _NAMED_OFFLINE_LOADERS[spec] = loader
    return loader


def offline_specs() -> tuple[str, ...]:
    """The `weights:` values that name an offline package explicitly."""
    return tuple(_NAMED_OFFLINE_LOADERS)


def load_named_offline(spec: str, backbone: str) -> ResolvedWeights:
    """Weights from the offline package named by ``spec``, or `WeightsUnavailable` saying why not."""
    loader = _NAMED_OFFLINE_LOADERS[spec]
    found = loader(backbone)
    if found is None:
        explain = getattr(loader, "unavailable_reason", None)
        reason = explain(backbone) if explain else f"it has no weights for {backbone}"
        raise WeightsUnavailable(f"`weights: {spec}` cannot be used: {reason}")
    return found


def load_offline_package(backbone: str) -> ResolvedWeights | None:
    for loader in _OFFLINE_LOADERS:
        found = loader(backbone)
        if found is not None:
            return found
    return None


def resolve_weights(backbone: str, spec: str) -> ResolvedWeights:
    """Turn a config's ``weights`` value into a state dict.

    ``random``: no pretrained weights (a loud warning; for plumbing tests).
    ``imagenet``: torchvision's weights via its cache, downloading only if reachable.
    ``auto``: $SPADE_WEIGHTS, else the torchvision cache, else an installed offline
    weights package; never a download.
    a registered offline package name (``resmem``, ``efficientnet_lite0_package``, ``efficientnet_lite2_package``):
    that package's weights.
    anything else: a path or fsspec URL of a state-dict file.
    """
    if spec == "random":
        LOG.warning(
            "\n%s\nUSING RANDOM BACKBONE WEIGHTS (weights: random). Anomaly scores will be meaningless;\n"
            "use this only to test plumbing. %s\n%s", "!" * 78, _how_to_supply(backbone), "!" * 78,
        )
        return ResolvedWeights(source="random", sha256="random", state_dict=None)
    if spec == "imagenet":
        return load_torchvision_imagenet(backbone, allow_download=True)
    if spec in _NAMED_OFFLINE_LOADERS:
        return load_named_offline(spec, backbone)
    if spec == "auto":
        env = os.environ.get(WEIGHTS_ENV)
        if env:
            return load_weights_file(env)
        if _torchvision_cached(backbone):
            return load_torchvision_imagenet(backbone, allow_download=False)
        found = load_offline_package(backbone)
        if found is not None:
            return found
        raise WeightsUnavailable(f"no ImageNet weights for {backbone} on this machine (weights: auto). " + _how_to_supply(backbone))
    return load_weights_file(spec)
