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


def running(cluster_class, engine: str, home, tmp_path_factory):
    """A started cluster of ``cluster_class`` for the module, stopped afterwards; a skip naming what is missing."""
    jar = jobserver_jar(engine)
    if home is None:
        pytest.skip(f"no {engine} distribution in {ENGINE_CACHE}: run `{FETCH_ENGINES}` (pip downloads it from PyPI)")
    cluster = cluster_class(tmp_path_factory.mktemp(f"{engine}-cluster"), home, jar)
    try:
        yield cluster.start_all()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def flink_cluster(tmp_path_factory):
    yield from running(FlinkSession, "flink", flink_home(), tmp_path_factory)


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    yield from running(SparkStandalone, "spark", spark_home(), tmp_path_factory)


def check_cluster_run(cluster, config, real_set, reference, tmp_path, what: str):  # noqa: F811
    """Fit and score on the cluster: the FnApiRunner's results, from work both machines' pools and engines did."""
    result = fit_and_score(config, as_urls(real_set), tmp_path, cluster.beam_args, root_url=True)
    assert_same_as_reference(reference, same_rows(result))
    started, ran = cluster.workers_started(), cluster.ran_work()
    print(f"{what}: SDK workers started by the two pools: {started}; {what} processes that ran work: {sorted(ran)}")
    assert len(started) == 2 and all(count >= 1 for count in started), started  # each machine's own pool
    # SDK workers kept between stages (pipelines.options.ENVIRONMENT_CACHE_MS): Flink 5 a pool, Spark 2; Spark started
    # 20-26 a pool, one per stage, each loading the backbone and the gallery again, before they were kept
    assert all(count <= 8 for count in started), started
    assert len(ran) == 2, ran


def test_cluster_flink_session_fit_and_score_match_fnapi(config, real_set, reference, tmp_path,  # noqa: F811
                                                         flink_cluster):
    check_cluster_run(flink_cluster, config, real_set, reference, tmp_path, "Flink TaskManager")


# Spark's job server ends its data channel with "CANCELLED: Multiplexer hanging up" after a successful job
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_cluster_spark_standalone_fit_and_score_match_fnapi(config, real_set, reference, tmp_path,  # noqa: F811
                                                            spark_cluster):
    check_cluster_run(spark_cluster, config, real_set, reference, tmp_path, "Spark worker")
