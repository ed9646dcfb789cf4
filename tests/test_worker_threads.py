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
