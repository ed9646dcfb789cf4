"""fit + score on real multi-process clusters, compared with the FnApiRunner: a Flink session cluster (a JobManager and
two TaskManagers, separate JVMs) and a Spark standalone cluster (a master and two workers), each behind Beam's job
server, with the pipeline's Python work in EXTERNAL SDK worker pools, one per task manager / worker (`tests.clusters`),
not in the launcher. Same rows, scores within 1e-5, same gallery hash and thresholds; the pools' own logs show that
they started the SDK workers, and the engine's own API that both task managers ran the work.

Needs Java 17, Beam's job-server jars (`scripts/fetch_jobservers.sh`) and the engines' distributions
(`scripts/fetch_engines.sh`); `.ci/run` fetches all of them. Each test skips, naming what is missing."""
from __future__ import annotations

import pytest

from tests.clusters import ENGINE_CACHE, FlinkSession, SparkStandalone, flink_home, spark_home
from tests.test_engines import (assert_same_as_reference, config, fit_and_score, jobserver_jar,  # noqa: F401
                                real_set, reference)

FETCH_ENGINES = f"scripts/fetch_engines.sh {ENGINE_CACHE}"


def as_urls(real_set) -> tuple[str, str]:
    """The inputs as file:// URLs: the workers are (as far as the launcher can tell) on other machines, which refuse
    bare local paths; every worker here sees this machine's files at the same path."""
    return tuple(f"file://{spec}" for spec in real_set)


def same_rows(result):
    """Rows keyed by path (the cluster run's URIs are file:// URLs of the FnApiRunner's paths)."""
    manifest, summary, rows = result
    return manifest, summary, {uri.removeprefix("file://"): {**row, "uri": uri.removeprefix("file://")}
                               for uri, row in rows.items()}


@pytest.fixture(scope="module")
def flink_cluster(tmp_path_factory):
    jar = jobserver_jar("flink")
    home = flink_home()
    if home is None:
        pytest.skip(f"no Flink distribution in {ENGINE_CACHE}: run `{FETCH_ENGINES}` (pip downloads it from PyPI)")
    cluster = FlinkSession(tmp_path_factory.mktemp("flink-cluster"), home, jar)
    try:
        yield cluster.start_all()
    finally:
        cluster.stop()


def test_cluster_flink_session_fit_and_score_match_fnapi(config, real_set, reference, tmp_path,  # noqa: F811
                                                         flink_cluster):
    result = fit_and_score(config, as_urls(real_set), tmp_path, flink_cluster.beam_args, root_url=True)
    assert_same_as_reference(reference, same_rows(result))
    started = flink_cluster.workers_started()
    print(f"Flink: SDK workers started by the two TaskManagers' pools: {started}; TaskManagers that ran subtasks: "
          f"{sorted(flink_cluster.task_managers_that_ran())}")
    assert len(started) == 2 and all(count >= 1 for count in started), started  # each task manager's own pool
    assert len(flink_cluster.task_managers_that_ran()) == 2


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    jar = jobserver_jar("spark")
    home = spark_home()
    if home is None:
        pytest.skip(f"no Spark distribution in {ENGINE_CACHE}: run `{FETCH_ENGINES}` (pip downloads it from PyPI)")
    cluster = SparkStandalone(tmp_path_factory.mktemp("spark-cluster"), home, jar)
    try:
        yield cluster.start_all()
    finally:
        cluster.stop()


# Spark's job server ends its data channel with "CANCELLED: Multiplexer hanging up" after a successful job
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_cluster_spark_standalone_fit_and_score_match_fnapi(config, real_set, reference, tmp_path,  # noqa: F811
                                                            spark_cluster):
    result = fit_and_score(config, as_urls(real_set), tmp_path, spark_cluster.beam_args, root_url=True)
    assert_same_as_reference(reference, same_rows(result))
    started = spark_cluster.workers_started()
    print(f"Spark: SDK workers started by the two workers' pools: {started}; workers that ran executors: "
          f"{sorted(spark_cluster.workers_that_ran())}")
    assert len(started) == 2 and all(count >= 1 for count in started), started  # each worker's own pool
    assert spark_cluster.workers_that_ran() == {"work-0", "work-1"}
