"""The backbone's runtimes give the same features: OpenVINO (the default) and channels-last against torch's NCHW
reference, in float32; in bfloat16 (feature_precision: bf16, the default) features close to float32's."""
import numpy as np
import pytest
import torch

from spade.config import SpadeConfig
from spade.features import runtime
from spade.features.backbone import FeatureExtractor
from spade.features.framing import framing_for
from spade.io.images import preprocess
from spade.io.samples import normal_surface


def frames(config: SpadeConfig, count: int = 3) -> torch.Tensor:
    rng = np.random.default_rng(0)
    framing = framing_for(config)
    images = [normal_surface(rng, config.frame_size[0] if config.frame_size else 256,
                             config.frame_size[1] if config.frame_size else 256) for _ in range(count)]
    return torch.stack([preprocess(image, config.resize, config.crop, config.mean, config.std, framing) for image in images])


CONFIGS = [  # in float32: the runtimes agree to its rounding (bf16's tests are below)
    SpadeConfig(frame_size=(256, 640), feature_precision="f32"),  # the default: EfficientNet-Lite2, 3 tiles, 3x3 aggregation
    SpadeConfig(backbone="resnet18", weights="random", framing="crop", resize=256, crop=224, feature_aggregation=1,
                feature_precision="f32"),
]


def assert_same_features(fast, reference, config: SpadeConfig) -> None:
    assert np.abs(fast.embedding - reference.embedding).max() <= 1e-4
    for layer in config.layers:
        assert fast.pyramid[layer].shape == reference.pyramid[layer].shape
        assert np.abs(fast.pyramid[layer] - reference.pyramid[layer]).max() <= 1e-4, layer
        assert fast.pyramid[layer].flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("config", CONFIGS, ids=["lite2-tiles", "resnet18-crop"])
def test_channels_last_matches_the_nchw_reference(config):
    batch = frames(config)
    fast = FeatureExtractor(config.replace(feature_runtime="channels_last"))(batch)
    reference = FeatureExtractor(config.replace(feature_runtime="eager"))(batch)
    assert_same_features(fast, reference, config)


@pytest.mark.parametrize("config", CONFIGS, ids=["lite2-tiles", "resnet18-crop"])
def test_openvino_matches_the_nchw_reference_and_converts_once_per_machine(config, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="feature_runtime: openvino needs the openvino package ([test] installs it)")
    monkeypatch.setattr(runtime, "BACKBONE_CACHE", str(tmp_path))
    batch = frames(config)
    reference = FeatureExtractor(config.replace(feature_runtime="eager"))(batch)
    assert_same_features(FeatureExtractor(config.replace(feature_runtime="openvino"))(batch), reference, config)
    assert_same_features(FeatureExtractor(config.replace(feature_runtime="openvino"))(batch[:2]), reference_of(reference, 2),
                         config)  # another batch size: the same converted model (dynamic batch)
    entries = [name for name in (p.name for p in tmp_path.iterdir()) if not name.startswith(".")]
    assert len(entries) == 1, entries  # converted once, then read from the cache
    assert (tmp_path / entries[0] / "model.xml").is_file()


def test_openvino_serves_threads_at_once(tmp_path, monkeypatch):
    """A Flink or Spark SDK worker runs bundles in several threads against one shared extractor: each thread gets
    its own inference request (one request serves one call at a time: "Infer Request is busy")."""
    pytest.importorskip("openvino", reason="feature_runtime: openvino needs the openvino package ([test] installs it)")
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(runtime, "BACKBONE_CACHE", str(tmp_path))
    config = CONFIGS[1].replace(feature_runtime="openvino")
    extractor = FeatureExtractor(config)
    batches = [frames(config, count=2 + i % 2) * (1.0 + 0.1 * i) for i in range(8)]
    alone = [extractor(batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(extractor, batches))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.embedding, b.embedding)
        for layer in config.layers:
            np.testing.assert_array_equal(a.pyramid[layer], b.pyramid[layer])


def test_openvino_builds_the_torch_network_only_to_convert_it(tmp_path, monkeypatch):
    """Building the torch backbone (importing timm, loading the weights) was 0.6 of the extractor's 0.8 s start in
    every process: with the converted model cached, an OpenVINO extractor gives the same features without it."""
    pytest.importorskip("openvino", reason="feature_runtime: openvino needs the openvino package ([test] installs it)")
    from spade.features import backbone

    monkeypatch.setattr(runtime, "BACKBONE_CACHE", str(tmp_path))
    config = CONFIGS[1].replace(feature_runtime="openvino")
    batch = frames(config, count=2)
    first = FeatureExtractor(config)
    reference = first(batch)
    assert first._model is not None  # the first machine-wide conversion needed it
    built = []
    real = backbone.build_backbone
    monkeypatch.setattr(backbone, "build_backbone", lambda *args: built.append(args) or real(*args))
    second = FeatureExtractor(config)
    again = second(batch)
    assert built == [] and second._model is None
    np.testing.assert_array_equal(again.embedding, reference.embedding)
    for layer in config.layers:
        np.testing.assert_array_equal(again.pyramid[layer], reference.pyramid[layer])
    second.classify(torch.zeros(1, 3, 64, 64))  # still there when asked for
    assert len(built) == 1


def test_openvino_threads_are_not_pinned_unless_asked(tmp_path, monkeypatch):
    """Pinned, every process of a machine puts its first stream on the first core: the SDK worker processes of one
    machine ran their feature pass 1.4-1.6x slower each (benchmarks/openvino_pinning.py)."""
    pytest.importorskip("openvino", reason="feature_runtime: openvino needs the openvino package ([test] installs it)")
    monkeypatch.setattr(runtime, "BACKBONE_CACHE", str(tmp_path))
    config = CONFIGS[1].replace(feature_runtime="openvino")
    extractor = FeatureExtractor(config)
    batch = frames(config, count=2)
    extractor(batch)
    default = extractor.runtime
    pinned = runtime.OpenVinoRuntime(default.net, default.key, threads=1, pinning=True)
    pinned(batch)
    size = (int(batch.shape[-2]), int(batch.shape[-1]))
    assert default._compiled[size].get_property("ENABLE_CPU_PINNING") is False
    assert pinned._compiled[size].get_property("ENABLE_CPU_PINNING") is True


FIRST_INFERENCES_AT_ONCE = """
import threading
import numpy as np
from spade.features.runtime import import_openvino
ov = import_openvino()
from openvino import opset13 as ops
param = ops.parameter([-1, 3, 16, 16], np.float32)
compiled = ov.Core().compile_model(ov.Model([ops.relu(param)], [param]), "CPU",
                                   {"NUM_STREAMS": 2, "INFERENCE_NUM_THREADS": 2})
requests = [compiled.create_infer_request() for _ in range(2)]
barrier = threading.Barrier(2)
def first_inference(request):
    barrier.wait()
    request.infer({0: np.ones((8, 3, 16, 16), np.float32)}, share_outputs=False)
threads = [threading.Thread(target=first_inference, args=(request,)) for request in requests]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("ok", flush=True)
"""


def test_two_threads_first_inferences_at_once_do_not_hang():
    """A process's first two inferences, on two threads at once (`spade score`'s two workers), hung for good in
    about 1 process of 7 before the numpy bridge was made ready first (`runtime._ready_numpy_bridge`): the race is
    once a process, so each try is a fresh process, 24 of them, four at a time."""
    pytest.importorskip("openvino", reason="feature_runtime: openvino needs the openvino package ([test] installs it)")
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    hung = 0
    for _ in range(6):
        children = [subprocess.Popen([sys.executable, "-c", FIRST_INFERENCES_AT_ONCE], cwd=root, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
        for child in children:
            try:
                out, err = child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                hung += 1
                continue
            assert child.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert hung == 0, f"{hung} of 24 processes hung in their first two inferences"


def reference_of(features, count: int):
    return type(features)(embedding=features.embedding[:count],
                          pyramid={layer: maps[:count] for layer, maps in features.pyramid.items()})


def test_openvino_missing_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match="pip install"):
        FeatureExtractor(SpadeConfig(backbone="resnet18", weights="random", feature_runtime="openvino"))


def test_an_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="feature_runtime must be one of channels_last, eager, openvino"):
        SpadeConfig(feature_runtime="onnx")


def relative_difference(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("runtime_name", ["openvino", "channels_last"])
def test_bf16_features_are_close_to_f32_and_come_from_bf16_arithmetic(runtime_name, tmp_path, monkeypatch, caplog):
    """feature_precision: bf16 runs the backbone in bfloat16 (OpenVINO's precision hint, torch's autocast): features
    within a few percent of their largest value of float32's, and not float32's (the setting takes effect). Hardware
    without bf16 arithmetic runs float32: then the closeness is asserted, and OpenVINO's log names the precision it
    runs in (f32, not the type's repr)."""
    if runtime_name == "openvino":
        pytest.importorskip("openvino", reason="feature_runtime: openvino needs the openvino package ([test] installs it)")
    monkeypatch.setattr(runtime, "BACKBONE_CACHE", str(tmp_path))
    config = CONFIGS[0].replace(feature_runtime=runtime_name)
    batch = frames(config, count=2)
    reference = FeatureExtractor(config)(batch)
    extractor = FeatureExtractor(config.replace(feature_precision="bf16"))
    with caplog.at_level("INFO", logger=runtime.__name__):
        bf16 = extractor(batch)
    differences = [relative_difference(bf16.embedding, reference.embedding)]
    differences += [relative_difference(bf16.pyramid[layer], reference.pyramid[layer]) for layer in config.layers]
    assert max(differences) < 0.1, differences
    assert all(bf16.pyramid[layer].dtype == np.float32 for layer in config.layers)
    tile = config.tile_size  # the frame's three tiles went through one compiled model
    executed = (str(extractor.runtime._compiled_for(tile, tile).get_property("INFERENCE_PRECISION_HINT"))
                if runtime_name == "openvino" else "bf16" if extractor.runtime.bf16 else "f32")
    if "bf16" in executed or "bfloat16" in executed:
        assert min(differences) > 1e-4, differences
    elif runtime_name == "openvino":
        assert "no bfloat16 arithmetic, so OpenVINO runs the backbone in f32 (" in caplog.text, caplog.text


@pytest.mark.parametrize("key, before, other, unknown, allowed", [
    ("feature_precision", "f32", "bf16", "fp8", "f32, bf16"),  # galleries before it were float32
    ("brightness", "keep", "imagenet_mean", "bright", "auto, keep, imagenet_mean"),  # galleries before it kept the frames
])
def test_feature_settings_that_old_galleries_need_not_list(key, before, other, unknown, allowed):
    """A feature setting added after galleries were first written: at its earlier value the signature (and hash)
    stays as it was, and scoring a gallery with the other value is refused, whichever side has which."""
    from spade.index.gallery import GalleryMismatch, check_compatible

    old, new = SpadeConfig(**{key: before}), SpadeConfig(**{key: other})
    assert key not in old.feature_signature()
    assert new.feature_signature() == old.feature_signature() | {key: other}
    for built, asked in ((old, new), (new, old)):
        manifest = {"feature_signature": built.feature_signature()}
        check_compatible(manifest, "gallery", built)
        with pytest.raises(GalleryMismatch, match=f"{key}: gallery has '{built.to_dict()[key]}', config has "
                                                  f"'{asked.to_dict()[key]}'"):
            check_compatible(manifest, "gallery", asked)
    with pytest.raises(ValueError, match=f"{key} must be one of {allowed}"):
        SpadeConfig(**{key: unknown})


def test_bf16_on_hardware_without_it_runs_float32(monkeypatch, caplog):
    """Where torch has no bfloat16 arithmetic (an older CPU, a GPU before Ampere), feature_precision: bf16 runs the
    backbone in float32 (oneDNN would refuse or emulate it) and says so: features equal to float32's."""
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    config = CONFIGS[1].replace(feature_runtime="channels_last")
    batch = frames(config, count=2)
    reference = FeatureExtractor(config)(batch)
    with caplog.at_level("INFO", logger=runtime.__name__):
        fallback = FeatureExtractor(config.replace(feature_precision="bf16"))(batch)
    assert "no bfloat16 arithmetic" in caplog.text
    np.testing.assert_array_equal(fallback.embedding, reference.embedding)
    for layer in config.layers:
        np.testing.assert_array_equal(fallback.pyramid[layer], reference.pyramid[layer])


def test_openvino_streams_fit_the_cores_with_each_callers_threads():
    assert runtime.streams_for(1, cores=2) == 2  # spade score's two workers on two cores, one thread each
    assert runtime.streams_for(2, cores=2) == 1
    assert runtime.streams_for(3, cores=2) == 1  # more threads than cores: still one stream
    assert runtime.streams_for(4, cores=16) == 4
    assert runtime.streams_for(0, cores=2) == 2


def test_openvino_streams_run_callers_side_by_side_with_the_same_features(tmp_path, monkeypatch):
    """Workers of one process share its runtime (`spade score`'s two on two cores, a thread each). OpenVINO runs one
    request at a time per stream, so the compiled model has a stream per caller the cores hold, each with the
    caller's threads; the features are those of one stream, bit for bit."""
    pytest.importorskip("openvino", reason="feature_runtime: openvino needs the openvino package ([test] installs it)")
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(runtime, "BACKBONE_CACHE", str(tmp_path))
    config = CONFIGS[1].replace(feature_runtime="openvino")
    shared = FeatureExtractor(config).runtime
    net, key = shared.net, shared.key
    one = runtime.OpenVinoRuntime(net, key, threads=1, precision="f32", streams=1)
    two = runtime.OpenVinoRuntime(net, key, threads=1, precision="f32", streams=2)
    batches = [frames(config, count=2) * (1.0 + 0.1 * i) for i in range(6)]
    alone = [one(batch) for batch in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(two, batches))
    for (embedding, maps), (same_embedding, same_maps) in zip(alone, together):
        np.testing.assert_array_equal(embedding.numpy(), same_embedding.numpy())
        for layer in config.layers:
            np.testing.assert_array_equal(maps[layer].numpy(), same_maps[layer].numpy())
    compiled = two._compiled_for(config.crop, config.crop)
    assert int(compiled.get_property("NUM_STREAMS")) == 2
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    assert int(one._compiled_for(config.crop, config.crop).get_property("NUM_STREAMS")) == 1
