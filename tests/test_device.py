"""`device`: the accelerator path's code runs here on the CPU and gives the CPU search's distances and features."""
import numpy as np
import pytest
import torch

from spade.config import SpadeConfig
from spade.features import runtime
from spade.features.runtime import resolve_device
from spade.scoring.correspondence import batch_layer_distances
from spade.scoring.device_search import device_layer_distances, image_distances
from tests.test_scoring_fast import brute, near_duplicates, npy_pyramid

CPU = torch.device("cpu")


@pytest.mark.parametrize("kappa", [1, 3])
def test_device_search_equals_the_cpu_search(tmp_path, kappa):
    rng = np.random.default_rng(0)
    n, positions, channels, batch = 9, 70, 16, 3
    gallery = (5.0 + rng.standard_normal((n, positions, channels))).astype(np.float32)
    pyramid = npy_pyramid(tmp_path, gallery)
    queries = (5.0 + rng.standard_normal((batch, positions, channels))).astype(np.float32)
    neighbours = np.array([[0, 1, 2], [2, 1, 0], [6, 7, 8]])
    chunks = []
    got = device_layer_distances(queries, pyramid, neighbours, kappa, CPU, on_chunk=chunks.append)
    np.testing.assert_allclose(got, batch_layer_distances(queries, pyramid, neighbours, kappa), rtol=0, atol=1e-5)
    for i in range(batch):
        flat = gallery[np.sort(neighbours[i])].reshape(-1, channels)
        assert np.abs(got[i] - brute(queries[i], flat, kappa)).max() <= 1e-5
    assert sum(chunks) == neighbours.size  # progress per neighbour row read


@pytest.mark.parametrize("kappa", [1, 3])
def test_device_search_settles_near_duplicates(kappa):
    """Candidates within float64 noise of the winners (exact duplicates) get their distances computed directly;
    small blocks make the search merge its kept candidates across blocks."""
    queries, gallery = near_duplicates(5, 600, 200)
    got = image_distances(torch.from_numpy(queries), torch.from_numpy(gallery), kappa, columns=128)
    assert np.abs(got.numpy() - brute(queries, gallery, kappa)).max() <= 1e-5


def test_resolve_device_auto_cpu_and_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    with pytest.raises(RuntimeError, match="set device: auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        SpadeConfig(device="tpu")


def test_a_cuda_device_runs_torch_whatever_the_cpu_runtime(monkeypatch):
    """On a CUDA device the CPU runtimes (OpenVINO, channels-last) give way to torch on the device."""
    net = runtime.PyramidNet(torch.nn.Sequential(), ("layer1",), None)
    moved = []
    monkeypatch.setattr(runtime.PyramidNet, "to", lambda self, **kwargs: moved.append(kwargs) or self)
    chosen = runtime.make_runtime("openvino", lambda: net, net.layers, "key", torch.device("cuda"))
    assert isinstance(chosen, runtime.TorchRuntime) and chosen.device == torch.device("cuda")
    assert moved[0]["device"] == torch.device("cuda")
