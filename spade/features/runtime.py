"""How the backbone runs: torch on CPU (NCHW, the reference, or channels-last), OpenVINO's CPU runtime, or torch on
a CUDA device (config ``device``).

Every runtime computes the same function, `PyramidNet`: a batch of frames -> the pooled embedding and the configured
layers' maps, in float32. They differ only in speed; the gallery records the runtime it was fitted with, and the
features of any two runtimes agree to float32 rounding (within 1e-4 on the tests' frames, 2.8e-4 on real frames whose
features reach ~45; the accuracy table is the same), so a gallery fitted with one can be scored with another.
OpenVINO (a dependency, the default runtime): its CPU plugin fuses the network into a few oneDNN kernels and runs
the feature pass several times faster than torch eager on the same threads (benchmarks/feature_pass.py).

The arithmetic is config ``feature_precision``, a feature setting the gallery records (fit and score must agree):
``f32`` (the reference) asks OpenVINO for float32 explicitly, since on CPUs with AMX or AVX512-BF16 its default is
bfloat16; ``bf16`` (the default) asks for bfloat16 (OpenVINO's inference precision hint; torch's autocast on the
torch runtimes), the network twice as fast where the hardware has bf16 arithmetic, with features differing from
float32's by a few percent of the largest feature (up to 12 % at the worst single value of real frames). Hardware
without it runs float32 and logs so: the features then differ from a bf16 gallery's as much, which the accuracy
table does not show (README "Accuracy": float32 features scored against bf16 galleries), so galleries and scoring
machines of either kind mix.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import numpy as np
import torch

from spade.config import DEVICES, stable_hash
from spade.io.cache import cached_build

LOG = logging.getLogger(__name__)

BACKBONE_CACHE = os.path.expanduser("~/.cache/spade/backbones")
OPENVINO_INSTALL = "pip install 'openvino>=2024.0' (a dependency of this package: pip install -e . installs it)"


class PyramidNet(torch.nn.Module):
    """The backbone as one function: frames (B, 3, H, W) -> (embedding (B, D), map of each of ``layers`` (B, C, h, w)).

    ``taps`` ({block index: layer name}) marks where a timm EfficientNet's layers are read; a torchvision ResNet's
    layers are its ``layer1``-``layer4`` modules. The embedding is the network's pooled last feature map, so every
    block up to the head runs whatever layers are kept.
    """

    def __init__(self, model: torch.nn.Module, layers: tuple[str, ...], taps: dict[int, str] | None):
        super().__init__()
        self.model = model
        self.layers = tuple(layers)
        self.taps = dict(taps) if taps else None

    def _resnet(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        maps: dict[str, torch.Tensor] = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(m, name)(x)
            maps[name] = x
        return torch.flatten(m.avgpool(x), 1), maps

    def _timm(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        maps: dict[str, torch.Tensor] = {}
        for index, block in enumerate(m.blocks):
            x = block(x)
            if index in self.taps:
                maps[self.taps[index]] = x
        x = m.bn2(m.conv_head(x))
        return m.forward_head(x, pre_logits=True), maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, maps = self._timm(x) if self.taps is not None else self._resnet(x)
        return (embedding, *(maps[name] for name in self.layers))


Runtime = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def resolve_device(name: str) -> torch.device:
    """The torch device of config ``device``: ``auto`` is the first CUDA device when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda, but torch sees no CUDA device (torch.cuda.is_available() is False): "
                           "install a CUDA build of torch on a machine with an NVIDIA GPU, or set device: auto or cpu")
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Whether torch runs bfloat16 convolutions natively on ``device`` (oneDNN's on CPUs with AVX-512 or AMX;
    elsewhere it refuses or emulates them slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query: assume not
        return False


class TorchRuntime:
    """`PyramidNet` in torch, NCHW (``eager``) or channels-last (NHWC: oneDNN's CPU convolutions skip layout
    conversions, 1.4-1.7x faster on EfficientNet-Lite0 at 256 px), on the CPU or a CUDA device (frames go there and
    the features come back to the CPU)."""

    def __init__(self, net: PyramidNet, channels_last: bool, device: torch.device = torch.device("cpu"),
                 precision: str = "f32"):
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.device = device
        self.net = net.to(device=device, memory_format=self.memory_format)
        self.bf16 = precision == "bf16" and bf16_supported(device)
        if precision == "bf16" and not self.bf16:
            LOG.info("feature_precision bf16: %s has no bfloat16 arithmetic torch can use; the backbone runs in "
                     "float32", device)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            frames = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            outputs = [out.float().cpu() for out in self.net(frames)]
        return outputs[0], dict(zip(self.net.layers, outputs[1:]))


def import_openvino():
    """The ``openvino`` module, its numpy bridge made ready (`_ready_numpy_bridge`), or an ImportError that says how
    to install it."""
    try:
        import openvino
    except ImportError:
        raise ImportError(f"feature_runtime: openvino needs the OpenVINO runtime: {OPENVINO_INSTALL}; "
                          "or set feature_runtime: channels_last") from None
    _ready_numpy_bridge(openvino)
    return openvino


_bridge_lock = threading.Lock()
_bridge_ready = False


def _ready_numpy_bridge(openvino) -> None:
    """Make OpenVINO's Python binding set up its numpy interface once, on one thread, before any inference.

    Its first numpy conversion initialises a C++ static that, inside, waits for the GIL; a second thread converting
    at the same moment holds the GIL while it waits for that static: both hang for good (0 % CPU, the whole process
    stuck, py-spy's native stacks: `__cxa_guard_acquire` against pybind11's `gil_safe_call_once_and_store<npy_api>`).
    `spade score`'s two worker threads both start with an inference: 2 of 38 scoring runs on metal_plate hung so, and
    6 of 40 fresh processes whose two threads' first inferences (a tiny model) met at a barrier; 0 of 40 with this
    done first (tests/test_feature_runtime.py)."""
    global _bridge_ready
    if _bridge_ready:
        return
    with _bridge_lock:
        if not _bridge_ready:
            openvino.Tensor(np.zeros(1, dtype=np.float32)).data.sum()
            _bridge_ready = True


def streams_for(threads: int, cores: int | None = None) -> int:
    """How many OpenVINO streams of ``threads`` threads fit on ``cores`` (default: this machine's): the callers
    that can run the backbone side by side without oversubscribing it (at least one)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, threads))


class OpenVinoRuntime:
    """`PyramidNet` compiled by OpenVINO for the CPU in ``precision`` (f32 or bf16), one compiled model per frame
    height and width (any batch size).

    Converting the torch network (tracing it) takes seconds, so the converted model is kept in a machine-wide cache
    (``cache_dir``, keyed by the network's identity ``key``, the frame size and the OpenVINO version) and later
    workers only compile it (~0.1 s). Each calling thread gets its own inference request: a worker that runs
    bundles in several threads shares one runtime (one request serves one call at a time).

    ``streams`` (default `streams_for`: as many as the machine's cores hold ``threads`` each) is how many of those
    requests run side by side. OpenVINO runs one at a time per stream, so with one stream (its latency hint's, the
    setting until 2026-12-06) the workers of one process that share this runtime (`spade score`'s two on two cores,
    a thread each) took turns at the backbone: two callers, 26.3 ms an image on bottle's frames against 14.2 with a
    stream each, 1.6-2.0x on the four shared sets, the same features bit for bit (benchmarks/openvino_streams.py).
    Each stream has ``threads`` threads; its buffers are allocated at its first request, so streams no caller uses
    cost nothing (a process with one caller: +149 MB after a batch of 8 at 256x256 with 8 streams as with 1).

    Its threads are not pinned to cores (``pinning``, OpenVINO's default on Linux): every process pins its first
    stream to the first core, so the several SDK worker processes of one machine (Flink or Spark worker pools, Dask,
    two runs at once) all ran their feature pass on the same cores, 1.3-1.8x slower each than unpinned
    (`benchmarks/openvino_pinning.py`); in one process the two make no difference.
    """

    def __init__(self, net: PyramidNet | Callable[[], PyramidNet], key: str, threads: int | None = None,
                 cache_dir: str | None = None, precision: str = "f32", streams: int | None = None,
                 pinning: bool = False, layers: tuple[str, ...] | None = None):
        self.ov = import_openvino()
        self._net = net if isinstance(net, PyramidNet) else None
        self._build_net = None if isinstance(net, PyramidNet) else net
        self.layers = tuple(net.layers if isinstance(net, PyramidNet) else layers)
        self.key = key
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        self.streams = streams or streams_for(self.threads)
        self.pinning = pinning
        self.cache_dir = cache_dir or BACKBONE_CACHE
        self.core = self.ov.Core()
        self._compiled: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()
        self._net_lock = threading.Lock()
        self._local = threading.local()

    @property
    def net(self) -> PyramidNet:
        """The torch network, built on first use: only a conversion needs it (a cached model does not)."""
        if self._net is None:
            with self._net_lock:
                if self._net is None:
                    self._net = self._build_net()
        return self._net

    def _model_file(self, height: int, width: int) -> str:
        key = stable_hash({"net": self.key, "size": [height, width], "openvino": self.ov.__version__})

        def convert(folder: str) -> None:
            started = time.perf_counter()
            example = torch.zeros(1, 3, height, width)
            with torch.inference_mode(False), torch.no_grad():
                model = self.ov.convert_model(self.net, example_input=example, input=[(-1, 3, height, width)])
            self.ov.save_model(model, os.path.join(folder, "model.xml"), compress_to_fp16=False)  # its default halves weights
            LOG.info("converted the backbone for OpenVINO at %dx%d in %.1f s (once per machine: %s)", width, height,
                     time.perf_counter() - started, self.cache_dir)

        return os.path.join(cached_build(f"openvino-{key}", convert, self.cache_dir), "model.xml")

    def _compiled_for(self, height: int, width: int):
        size = (height, width)
        with self._lock:  # one conversion and compilation per size, whichever thread asks first
            if size not in self._compiled:
                model = self.core.read_model(self._model_file(height, width))
                compiled = self.core.compile_model(model, "CPU", {
                    "INFERENCE_PRECISION_HINT": self.precision,
                    "INFERENCE_NUM_THREADS": self.threads * self.streams,
                    "NUM_STREAMS": self.streams,
                    "ENABLE_CPU_PINNING": self.pinning,
                })
                hint = compiled.get_property("INFERENCE_PRECISION_HINT")
                executed = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # f32, not <Type: ...>
                if self.precision == "bf16" and "bf16" not in executed and "bfloat16" not in executed:
                    LOG.info("feature_precision bf16: this CPU has no bfloat16 arithmetic, so OpenVINO runs the "
                             "backbone in %s (as fast as feature_precision: f32; the accuracy of bf16 galleries "
                             "is unchanged, README \"Accuracy\")", executed)
                self._compiled[size] = compiled
            return self._compiled[size]

    def _request(self, height: int, width: int):
        """This thread's inference request for frames of ``height`` x ``width``."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        if (height, width) not in requests:
            requests[(height, width)] = self._compiled_for(height, width).create_infer_request()
        return requests[(height, width)]

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        request = self._request(int(batch.shape[-2]), int(batch.shape[-1]))
        result = request.infer({0: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}, share_outputs=False)
        outputs = [torch.from_numpy(np.asarray(result[port])) for port in request.model_outputs]
        return outputs[0], dict(zip(self.layers, outputs[1:]))


def make_runtime(name: str, build_net: Callable[[], PyramidNet], layers: tuple[str, ...], key: str,
                 device: torch.device = torch.device("cpu"), precision: str = "f32") -> Runtime:
    """The runtime ``name`` (config `feature_runtime`) for the network ``build_net`` makes (its maps ``layers``) on
    ``device`` in ``precision`` (config `feature_precision`); ``key`` identifies the network's weights. On a CUDA
    device torch runs the network whatever ``name`` says (the CPU runtimes are for CPUs). OpenVINO builds the torch
    network only to convert it, once a machine: building it (importing timm, loading the weights) took 0.6 of the
    extractor's 0.8 s start in every process."""
    if device.type == "cuda":
        return TorchRuntime(build_net(), channels_last=name != "eager", device=device, precision=precision)
    if name == "openvino":
        return OpenVinoRuntime(build_net, key, precision=precision, layers=layers)
    if name in ("channels_last", "eager"):
        return TorchRuntime(build_net(), channels_last=name == "channels_last", precision=precision)
    raise ValueError(f"unknown feature_runtime {name!r}")
