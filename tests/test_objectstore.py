"""The at-scale path on a real S3 server (SeaweedFS in a process of its own, reached through s3fs): objects written
once to their final keys, tables visible at one commit, the lease taken with a conditional create, and `spade fit`,
`spade score --date` (re-run, SIGKILL, two at once) and `spade report` with archive, gallery and outputs all at s3://
URLs. Without Go (no SeaweedFS built) the tests skip, saying what is missing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from spade.io import publication, storage
from spade.io.lease import LeaseHeld, RunLease
from spade.io.results import read_score_table
from spade.io.samples import SampleSpec, write_sample_dataset
from tests.conftest import BEAM_ARGS, TINY, plumbing_config
from tests.objectstores import (BUILD_HINT, GCS_BUILD_HINT, CountingProxy, FakeGcs, SeaweedS3, cached_binary,
                                weed_binary)

DAY = "2026-11-30"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    binary = weed_binary()
    if binary is None:
        pytest.skip(BUILD_HINT)
    server = SeaweedS3(binary, tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {key: os.environ.get(key) for key in server.env()}
    os.environ.update(server.env())  # this process's s3fs (botocore reads the endpoint from the environment)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    binary = cached_binary("fake-gcs", "fake-gcs-server-")
    if binary is None:
        pytest.skip(GCS_BUILD_HINT)
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (`pip install -e .[test]` installs it)")
    server = FakeGcs(binary, tmp_path_factory.mktemp("fake-gcs")).start()
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ.update(server.env())
    yield server
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved
    server.stop()


def keys(server: SeaweedS3, bucket: str) -> list[str]:
    return sorted(server.filesystem().find(bucket))


def leftovers(server: SeaweedS3, bucket: str) -> list[str]:
    """Keys no finished run should leave: temporary keys, scratch folders, ledgers, leases, probes."""
    marks = ("/.tmp-", "/_staging-", "/_ledger-", "/_lease-", "/_probe-", ".tmp")
    return [key for key in keys(server, bucket) if any(mark in key for mark in marks)]


def spade_cli(args: list[str], server: SeaweedS3, tmp_path: Path, endpoint: str | None = None) -> subprocess.Popen:
    """`spade ARGS` in a process of its own that reaches the S3 server (through ``endpoint`` when given)."""
    tmpdir = tmp_path / f"tmp-{time.monotonic_ns()}"
    tmpdir.mkdir()
    command = [sys.executable, "-m", "pipelines.cli", *args, *BEAM_ARGS]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **server.env(endpoint), "TMPDIR": str(tmpdir)})


def finished(process: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out, err


@pytest.fixture(scope="module")
def plant(s3, tmp_path_factory):
    """A bucket holding an archive (normals, and a night of 30 test inputs) and a tiny config; the gallery is fitted
    by `spade fit` into the bucket (the first end-to-end step)."""
    bucket = s3.new_bucket()
    data = write_sample_dataset(f"s3://{bucket}/archive", SampleSpec(size=64, train=6, test_good=10, test_per_defect=10))
    config_file = tmp_path_factory.mktemp("s3-config") / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(plumbing_config(**TINY).to_dict()))
    inputs = sorted(f"s3://{key}" for key in s3.filesystem().find(f"{data[5:]}/test"))
    assert len(inputs) == 30
    gallery = f"s3://{bucket}/galleries/tiny"
    return {"bucket": bucket, "data": data, "config": str(config_file), "gallery": gallery, "inputs": inputs,
            "images": f"{data}/test"}


def test_objectstore_objects_are_written_once_to_their_final_key(s3, monkeypatch):
    """No temporary key, no copy: a PUT is already all-or-nothing on S3. And the conditional create is honoured."""
    import s3fs

    bucket = s3.new_bucket()

    def refuse(*args, **kwargs):
        raise AssertionError("an object store write went through a copy or rename")

    for name in ("mv", "copy", "_copy", "_mv_file", "rename"):
        monkeypatch.setattr(s3fs.S3FileSystem, name, refuse, raising=False)
    storage.write_json(f"s3://{bucket}/run/run.json", {"a": 1})
    storage.atomic_write_bytes(f"s3://{bucket}/maps/x.png", b"png")
    import pyarrow as pa

    storage.write_parquet(f"s3://{bucket}/scores/t.parquet", pa.table({"uri": ["a", "b"]}))
    assert keys(s3, bucket) == [f"{bucket}/maps/x.png", f"{bucket}/run/run.json", f"{bucket}/scores/t.parquet"]
    assert storage.read_json(f"s3://{bucket}/run/run.json") == {"a": 1}
    assert storage.create_exclusive(f"s3://{bucket}/lock", b"first")
    assert not storage.create_exclusive(f"s3://{bucket}/lock", b"second")
    assert storage.read_bytes(f"s3://{bucket}/lock") == b"first"
    assert storage.exclusive_create_note(f"s3://{bucket}/folder") is None  # the probe found conditional PUTs honoured
    assert not leftovers(s3, bucket)


def test_objectstore_table_becomes_visible_at_one_commit(s3):
    import pyarrow as pa

    folder = f"s3://{s3.new_bucket()}/scores"
    publication.adopt(folder, "first")
    storage.write_parquet(f"{folder}/first-part-00000-of-00001.parquet", pa.table({"uri": ["old"]}))
    publication.commit(folder, [f"{folder}/first-part-00000-of-00001.parquet"], "first", replace=True)
    for i in range(3):  # a second run's files land one by one: readers still see the first table only
        storage.write_parquet(f"{folder}/second-part-{i:05d}-of-00003.parquet", pa.table({"uri": [f"new-{i}"]}))
        assert storage.read_parquet(publication.table_files(folder)).column("uri").to_pylist() == ["old"]
    storage.write_parquet(f"{folder}/killed-part-00000-of-00001.parquet", pa.table({"uri": ["never"]}))
    publication.commit(folder, publication.run_files(folder, "second"), "second", replace=True)
    assert sorted(storage.read_parquet(publication.table_files(folder)).column("uri").to_pylist()) == \
        ["new-0", "new-1", "new-2"]
    assert sorted(url.rsplit("/", 1)[-1] for url in storage.list_files(folder, ".parquet")) == \
        [f"second-part-{i:05d}-of-00003.parquet" for i in range(3)]  # the replaced and the killed run's are gone


RACER = """
import json, os, sys, time
from spade.io.lease import LeaseHeld, RunLease
sync, root, name, tries = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def meet(step):
    # a barrier of the two racers (files in a local folder): both go on within a few milliseconds of each other
    open(os.path.join(sync, f"{step}-{name}"), "w").close()
    deadline = time.monotonic() + 120
    while len([f for f in os.listdir(sync) if f.startswith(f"{step}-")]) < 2:
        assert time.monotonic() < deadline, f"the other racer never reached {step}"
        time.sleep(0.002)


outcomes = []
for attempt in range(tries):
    lease = RunLease(f"{root}/race-{attempt}", name, "race")
    meet(f"start{attempt}")  # both take the lease at the same instant
    try:
        lease.acquire()
        outcomes.append("held")
    except LeaseHeld:
        outcomes.append("refused")
    meet(f"decided{attempt}")  # the holder keeps it until the other has decided
    if outcomes[-1] == "held":
        lease.release()
print(json.dumps(outcomes))
"""


def test_objectstore_lease_two_racers_one_holder_twenty_of_twenty(s3):
    """Two processes take the same lease at the same instant, 20 times: each time exactly one holds it and the other
    is refused, so two runs can never both hold it."""
    bucket = s3.new_bucket()
    first, second = race(f"s3://{bucket}", s3.env())
    assert len(first) == 20 and all(sorted(pair) == ["held", "refused"] for pair in zip(first, second)), (first, second)
    print(f"lease races: {sum(pair in (('held', 'refused'), ('refused', 'held')) for pair in zip(first, second))} of 20 "
          "with one holder and one refused")
    assert not leftovers(s3, bucket)


def race(root: str, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """Two racer processes take the same lease at the same instant, 20 times (a fresh folder each time); each racer's
    outcome per attempt."""
    with tempfile.TemporaryDirectory(prefix="spade-race-") as sync:
        racers = [subprocess.Popen([sys.executable, "-c", RACER, sync, root, f"racer-{i}", "20"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, **env}) for i in range(2)]
        results = [p.communicate(timeout=600) for p in racers]
    assert all(p.returncode == 0 for p in racers), [err[-2000:] for _, err in results]
    return tuple(json.loads(out) for out, _ in results)


def test_objectstore_gcs_conditional_create_commit_and_lease(gcs, monkeypatch):
    """GCS's own path (gcsfs against fake-gcs-server): ifGenerationMatch=0 honoured, objects written once to their
    final keys, a table visible at one commit, a held lease refused."""
    import gcsfs
    import pyarrow as pa

    bucket = gcs.new_bucket()
    assert storage.create_exclusive(f"gs://{bucket}/lock", b"first")
    assert not storage.create_exclusive(f"gs://{bucket}/lock", b"second")
    assert storage.read_bytes(f"gs://{bucket}/lock") == b"first"
    assert storage.exclusive_create_note(f"gs://{bucket}/folder") is None

    def refuse(*args, **kwargs):
        raise AssertionError("an object store write went through a copy or rename")

    for name in ("mv", "copy", "_copy", "_mv_file", "rename", "_cp_file"):
        monkeypatch.setattr(gcsfs.GCSFileSystem, name, refuse, raising=False)
    folder = f"gs://{bucket}/scores"
    publication.adopt(folder, "first")
    storage.write_parquet(f"{folder}/first-part-00000-of-00001.parquet", pa.table({"uri": ["old"]}))
    assert publication.table_files(folder) == []  # written, not committed
    publication.commit(folder, publication.run_files(folder, "first"), "first", replace=True)
    assert storage.read_parquet(publication.table_files(folder)).column("uri").to_pylist() == ["old"]
    monkeypatch.undo()
    with RunLease(f"gs://{bucket}/night", "first", "spade score"):
        with pytest.raises(LeaseHeld, match="being written by spade score first"):
            RunLease(f"gs://{bucket}/night", "second", "spade score").acquire()
    assert not [key for key in gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True).find(bucket)
                if "/_lease-" in key or "/_probe-" in key]


def test_objectstore_fit_score_nightly_report_end_to_end(s3, plant, tmp_path):
    out, report = f"s3://{plant['bucket']}/scores", f"s3://{plant['bucket']}/report"
    finished(spade_cli(["fit", "--config", plant["config"], "--images", f"{plant['data']}/train/good", "--gallery",
                        plant["gallery"]], s3, tmp_path))
    assert storage.exists(f"{plant['gallery']}/manifest.json")
    score = ["score", "--config", plant["config"], "--gallery", plant["gallery"], "--images", plant["images"],
             "--out", out, "--date", DAY]
    _, err = finished(spade_cli(score, s3, tmp_path))
    assert "30 new" in err, err[-2000:]
    rows = read_score_table(out).to_pylist()
    assert sorted(r["uri"] for r in rows) == plant["inputs"]  # one row per input
    assert all(r["status"] == "ok" for r in rows)
    _, err = finished(spade_cli(score, s3, tmp_path))  # the night again: nothing new, nothing doubled
    assert "0 new, 30 already scored" in err, err[-2000:]
    assert sorted(r["uri"] for r in read_score_table(out).to_pylist()) == plant["inputs"]
    masks = f"{plant['data']}/ground_truth"
    finished(spade_cli(["report", "--scores", out, "--masks", masks, "--out", report], s3, tmp_path))
    assert b"<html" in storage.read_bytes(f"{report}/index.html").lower()
    maps = [key for key in keys(s3, plant["bucket"]) if "/maps/" in key]
    assert len(maps) == 30
    assert not leftovers(s3, plant["bucket"])


def committed_units(fs, out: str) -> int:
    """Ledger parts under ``out``, through one client (``fs``) polled often: a new client per poll is too slow to
    catch a run of 15 small units in the middle."""
    return sum(1 for key in fs.find(out[5:]) if "/_ledger-" in key and "/unit-" in key)


def test_objectstore_killed_run_resumes_without_rescoring_what_it_committed(s3, plant, tmp_path):
    """SIGKILL mid-night, then the same command: what the killed run committed is kept (at most 60 % scored again),
    one row per input, nothing left behind."""
    if not storage.exists(f"{plant['gallery']}/manifest.json"):
        finished(spade_cli(["fit", "--config", plant["config"], "--images", f"{plant['data']}/train/good",
                            "--gallery", plant["gallery"]], s3, tmp_path))
    out = f"s3://{plant['bucket']}/killed"
    score = ["score", "--config", plant["config"], "--gallery", plant["gallery"], "--images", plant["images"],
             "--out", out, "--date", DAY]
    run = spade_cli(score, s3, tmp_path)
    deadline = time.monotonic() + 300
    fs = s3.filesystem()
    while committed_units(fs, out) < 8:  # of 15 units (2 inputs each)
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "no 8 units committed within 300 s"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    _, err = finished(spade_cli(score, s3, tmp_path))
    line = next(text for text in err.splitlines() if " new" in text and "scored" in text)
    new = int(line.split(" new")[0].rsplit(" ", 1)[-1])
    print(f"after SIGKILL: the re-run scored {new} of {len(plant['inputs'])} inputs again: {line}")
    assert new <= 0.6 * len(plant["inputs"]), line
    assert "committed by an interrupted run" in line, line
    rows = read_score_table(out).to_pylist()
    assert sorted(r["uri"] for r in rows) == plant["inputs"]
    assert not leftovers(s3, plant["bucket"])


def test_objectstore_two_runs_started_together_one_scores_one_exits_75(s3, plant, tmp_path):
    if not storage.exists(f"{plant['gallery']}/manifest.json"):
        finished(spade_cli(["fit", "--config", plant["config"], "--images", f"{plant['data']}/train/good",
                            "--gallery", plant["gallery"]], s3, tmp_path))
    for attempt in range(2):
        out = f"s3://{plant['bucket']}/together-{attempt}"
        score = ["score", "--config", plant["config"], "--gallery", plant["gallery"], "--images", plant["images"],
                 "--out", out, "--date", DAY]
        runs = [spade_cli(score, s3, tmp_path) for _ in range(2)]
        results = [(p.communicate(timeout=600), p.returncode) for p in runs]
        codes = sorted(code for _, code in results)
        assert codes == [0, 75], [err[-1500:] for (_, err), _ in results]
        refused = next(err for (_, err), code in results if code == 75)
        assert "is being written by spade score" in refused
        assert sorted(r["uri"] for r in read_score_table(out).to_pylist()) == plant["inputs"]
    assert not leftovers(s3, plant["bucket"])


def test_objectstore_tar_shard_is_downloaded_once(s3, plant, tmp_path):
    """A tar shard in the bucket is counted and read from one download: the bytes the server sends (through a
    counting proxy) are its size within 5 %."""
    local = Path(write_sample_dataset(str(tmp_path / "big"), SampleSpec(size=160, train=0, test_good=12,
                                                                         test_per_defect=4)))
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for path in sorted((local / "test").rglob("*.png")):
            archive.add(path, arcname=str(path.relative_to(local)))
    members = sum(1 for _ in (local / "test").rglob("*.png"))
    bucket = plant["bucket"]
    s3.filesystem().put_file(str(shard), f"{bucket}/shards/night/shard-000.tar")
    gallery = tmp_path / "gallery"  # local: only the archive is read from the server
    config = plumbing_config(**TINY)
    from pipelines.fit import run_fit

    run_fit(config, f"{plant['data']}/train/good", str(gallery), BEAM_ARGS)
    proxy = CountingProxy(("127.0.0.1", int(s3.endpoint.rsplit(":", 1)[-1])))
    try:
        out = tmp_path / "tar-scores"
        finished(spade_cli(["score", "--config", plant["config"], "--gallery", str(gallery), "--images",
                            f"s3://{bucket}/shards/night/", "--out", str(out)], s3, tmp_path, endpoint=proxy.endpoint))
        downloaded = proxy.downloaded
    finally:
        proxy.close()
    size = shard.stat().st_size
    print(f"tar shard: {size} bytes; the server sent {downloaded} bytes ({downloaded / size:.3f}x)")
    assert abs(downloaded - size) <= 0.05 * size, (downloaded, size)
    rows = read_score_table(str(out)).to_pylist()
    assert len(rows) == members and all(r["status"] == "ok" for r in rows)
