"""fit + score on real engines (embedded Flink, Spark local[2], Beam's portable job service with an EXTERNAL worker
pool), compared with the FnApiRunner on a small real set: same rows, scores within 1e-5, same gallery hash.

Job servers: Beam's Java job servers, run from jars fetched once by `scripts/fetch_jobservers.sh` (the CI does it
before pytest; Maven Central serves Beam's runner libraries up to 2.62.0 for both engines, not the 2.77.0
job-server jars, so the jars are Beam 2.62.0 job servers driving this Python 2.77 SDK). The jar's local path is
always passed explicitly, so nothing downloads while a pipeline runs. Each test skips, naming what is missing,
where there is no JVM or no jar.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spade.io.results import read_score_table
from pipelines.fit import run_fit
from pipelines.options import load_runner_profile
from pipelines.score import run_score
from tests.conftest import BEAM_ARGS, plumbing_config, shared_dataset

JOBSERVER_VERSION = "2.62.0"
JAR_CACHE = Path(os.environ.get("SPADE_JOBSERVER_CACHE", Path.home() / ".cache" / "spade" / "beam-jobservers"))
FETCH = f"scripts/fetch_jobservers.sh {JAR_CACHE}"
PROFILES = Path(__file__).resolve().parents[1] / "configs" / "runners"


def profile(name: str, *overrides: str) -> list[str]:
    """A runner profile's Beam arguments, then this machine's (later arguments win, as on the command line)."""
    return load_runner_profile(str(PROFILES / f"{name}.yaml")) + list(overrides)


def jobserver_jar(engine: str) -> str:
    """The local job-server jar of ``engine`` (flink/spark), or a skip naming what is missing."""
    if shutil.which("java") is None:
        pytest.skip(f"{engine}: no JVM (`java` is not on PATH; install a Java 17 runtime)")
    env = os.environ.get(f"BEAM_{engine.upper()}_JOB_SERVER_JAR")
    jar = Path(env) if env else JAR_CACHE / f"beam-{engine}-job-server-{JOBSERVER_VERSION}.jar"
    if not jar.is_file():
        pytest.skip(f"{engine}: job-server jar {jar} is missing; fetch it once from Maven Central with `{FETCH} {engine}` "
                    f"(needs mvn), or set BEAM_{engine.upper()}_JOB_SERVER_JAR")
    return str(jar)


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    """10 bottle training images and 8 test images (good and defective), read in place."""
    bottle = shared_dataset("mvtec_ad_bottle")
    return f"{bottle}/train/good/00[0-9].png", f"{bottle}/test/*/00[0-1].png"


@pytest.fixture(scope="module")
def config():
    return plumbing_config(calibration_images=3, batch_size=4, k=3)


def fit_and_score(config, real_set, root: Path, args: list[str], root_url: bool = False):
    """Fit, then score, under ``root`` (as a file:// URL with ``root_url``: workers on other machines refuse local
    paths)."""
    train, test = real_set
    base = f"file://{root}" if root_url else str(root)
    manifest = run_fit(config, train, f"{base}/gallery", args)
    summary = run_score(config, f"{base}/gallery", test, f"{base}/out", args)
    rows = {r["uri"]: r for r in read_score_table(f"{base}/out").to_pylist()}
    return manifest, summary, rows


@pytest.fixture(scope="module")
def reference(config, real_set, tmp_path_factory):
    return fit_and_score(config, real_set, tmp_path_factory.mktemp("fnapi"), BEAM_ARGS)


def assert_same_as_reference(reference, result):
    ref_manifest, ref_summary, ref_rows = reference
    manifest, summary, rows = result
    assert manifest["num_images"] == ref_manifest["num_images"] == 10
    assert manifest["gallery_hash"] == ref_manifest["gallery_hash"]
    assert manifest["thresholds"]["image"] == pytest.approx(ref_manifest["thresholds"]["image"], abs=1e-5)
    assert (summary["rows"], summary["ok"]) == (ref_summary["rows"], ref_summary["ok"]) == (8, 8)
    assert rows.keys() == ref_rows.keys()
    for uri, ref in ref_rows.items():
        row = rows[uri]
        assert row["image_score"] == pytest.approx(ref["image_score"], abs=1e-5), uri
        assert row["pixel_max"] == pytest.approx(ref["pixel_max"], abs=1e-5), uri
        assert (row["neighbours"], row["status"], row["label"]) == (ref["neighbours"], ref["status"], ref["label"])
        assert row["gallery_hash"] == ref["gallery_hash"]


def test_flink_embedded_fit_and_score_match_fnapi(config, real_set, reference, tmp_path):
    jar = jobserver_jar("flink")
    args = profile("flink-local", f"--flink_job_server_jar={jar}")
    assert_same_as_reference(reference, fit_and_score(config, real_set, tmp_path, args))


# Spark's job server ends its data channel with "CANCELLED: Multiplexer hanging up" after a successful job
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_spark_local_fit_and_score_match_fnapi(config, real_set, reference, tmp_path):
    jar = jobserver_jar("spark")
    args = profile("spark-local", f"--spark_job_server_jar={jar}")
    assert_same_as_reference(reference, fit_and_score(config, real_set, tmp_path, args))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s: {log.read_text()[-2000:]}")


@pytest.fixture()
def external_worker_pool(tmp_path):
    """Beam's portable job service (Python) and an EXTERNAL SDK worker pool, each its own process: the pipeline's
    workers run in processes separate from the launcher. Both stopped (by their process ids) afterwards."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    job_port, pool_port = _free_port(), _free_port()
    processes = []
    try:
        for what, module, port in (("job service", "apache_beam.runners.portability.local_job_service_main", job_port),
                                   ("worker pool", "apache_beam.runners.worker.worker_pool_main", pool_port)):
            log = tmp_path / f"{what.replace(' ', '-')}.log"
            flag = "--port" if what == "job service" else "--service_port"
            process = subprocess.Popen([sys.executable, "-m", module, f"{flag}={port}"], env=env, cwd=repo,
                                       stdout=log.open("w"), stderr=subprocess.STDOUT)
            processes.append(process)
            _wait_for_port(port, process, what, log)
        yield job_port, pool_port
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def test_portable_external_worker_pool_fit_and_score_match_fnapi(config, real_set, reference, tmp_path,
                                                                 external_worker_pool):
    job_port, pool_port = external_worker_pool
    args = profile("portable-external", f"--job_endpoint=localhost:{job_port}", f"--environment_config=localhost:{pool_port}")
    assert_same_as_reference(reference, fit_and_score(config, real_set, tmp_path / "run", args))
