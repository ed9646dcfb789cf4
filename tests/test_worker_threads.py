"""num_threads: 0 (auto) shares the cores between local workers instead of giving each worker all of them."""
import os

from pipelines.options import local_workers, with_worker_threads
from spade.config import SpadeConfig


def test_auto_threads_are_cores_divided_by_local_workers():
    cores = os.cpu_count() or 1
    auto = SpadeConfig(num_threads=0)
    assert local_workers(None) == 1
    assert with_worker_threads(auto, None).num_threads == 0  # one worker: all cores (the default)
    two = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert local_workers(two) == 2
    assert with_worker_threads(auto, two).num_threads == max(1, cores // 2)
    assert local_workers(["--runner=FnApiRunner", "--direct_num_workers", "0"]) == cores  # 0: one per core
    assert with_worker_threads(SpadeConfig(num_threads=3), two).num_threads == 3  # explicit wins


def test_remote_runners_keep_auto_threads():
    dask = ["--runner=DaskRunner", "--direct_num_workers=4"]
    assert local_workers(dask) == 1
    assert with_worker_threads(SpadeConfig(num_threads=0), dask).num_threads == 0


def test_scoring_on_the_default_runner_takes_two_worker_threads(monkeypatch, tmp_path):
    """`spade score` without --runner scores in two local worker threads (the measured faster setting on 2 cores),
    one image in one worker; any runner or worker argument given is kept as given."""
    from pipelines.options import SCORING_WORKERS, scoring_args
    from spade.io.listing import names_one_image

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    default = scoring_args(None)
    assert local_workers(default) == SCORING_WORKERS == 2
    assert with_worker_threads(SpadeConfig(num_threads=0), default).num_threads == 1
    assert "--direct_running_mode=multi_threading" in default
    assert scoring_args(None, one_image=lambda: True) == []
    asked = []
    for given in (["--runner=FnApiRunner"], ["--direct_num_workers", "1"], ["--direct_running_mode=multi_processing"],
                  ["--runner", "DaskRunner"]):
        assert scoring_args(given, one_image=lambda: asked.append(1) or True) == given
    assert not asked  # the one-image check (a request on object storage) is not made where a runner is given
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert scoring_args(None) == []

    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG")
    (tmp_path / "shard.tar").write_bytes(b"")
    assert names_one_image(str(image)) and names_one_image(f"file://{image}")
    for spec in (str(tmp_path), f"{tmp_path}/*.png", str(tmp_path / "shard.tar"), str(tmp_path / "missing.png")):
        assert not names_one_image(spec), spec
