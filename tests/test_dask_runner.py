"""The same pipelines on a real distributed engine: Beam's Dask runner on a local 2-worker dask.distributed cluster."""
import pytest
import torch
import torchvision

from spade.io.results import read_score_table
from pipelines.fit import run_fit
from pipelines.score import run_score
from tests.conftest import BEAM_ARGS, plumbing_config

distributed = pytest.importorskip("distributed", reason="dask[distributed] is part of the [test] extra")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A fixed resnet18 state dict: every worker process must build the very same backbone."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18-fixed.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local


def test_dask_runner_gives_the_direct_runner_table(sample_root, tmp_path, weights_file, cluster):
    config = plumbing_config(weights=weights_file, calibration_images=2, batch_size=2)
    dask_args = ["--runner", "DaskRunner", f"--dask_client_address={cluster.scheduler_address}"]
    tables = {}
    for name, args in (("direct", BEAM_ARGS), ("dask", dask_args)):
        gallery = str(tmp_path / name / "gallery")
        manifest = run_fit(config, f"{sample_root}/train/good", gallery, args)
        summary = run_score(config, gallery, sample_root, str(tmp_path / name / "out"), args)
        assert manifest["num_images"] == 8 and summary["ok"] == 9
        tables[name] = {r["uri"]: r for r in read_score_table(str(tmp_path / name / "out")).to_pylist()}
    assert tables["direct"].keys() == tables["dask"].keys()
    for uri, direct in tables["direct"].items():
        dask = tables["dask"][uri]
        assert dask["image_score"] == pytest.approx(direct["image_score"], abs=1e-5)
        assert dask["pixel_max"] == pytest.approx(direct["pixel_max"], abs=1e-5)
        assert dask["neighbours"] == direct["neighbours"] and dask["gallery_hash"] == direct["gallery_hash"]
