"""An operator's nightly run, with real faults: `spade score` processes killed with SIGKILL, interrupted with
SIGINT/SIGTERM, and started twice at once; the lease and the cleanup after killed runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spade.io import publication, storage
from spade.io.lease import LEASE_PREFIX, OWNER, LeaseHeld, RunLease, lease_keys, staging_is_live
from spade.io.results import read_score_table
from tests.conftest import spade_process

DAY = "2026-11-30"


@pytest.fixture(scope="module")
def night(tiny_night):
    return tiny_night


def spade_score(night, out, tmpdir, *extra) -> subprocess.Popen:
    """`spade score --date` as an operator starts it: its own process, its own temporary directory."""
    return spade_process(["score", "--config", night["config"], "--gallery", night["gallery"], "--images",
                          night["images"], "--out", str(out), "--date", DAY, *extra], tmpdir)


def ledger_parts(out) -> list[Path]:
    return sorted(Path(out).glob("gallery=*/date=*/_ledger-*/unit-*.parquet"))


def wait_for_parts(process, out, count, timeout=300.0) -> int:
    """Poll the run ledger until ``count`` units are committed (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = len(ledger_parts(out))
        if found >= count:
            return found
        assert process.poll() is None, f"run ended before {count} units were committed: {process.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"no {count} committed units within {timeout}s")


def assert_one_row_per_input(out, inputs):
    rows = read_score_table(str(out)).to_pylist()
    uris = [r["uri"] for r in rows]
    assert sorted(uris) == sorted(inputs), "every input exactly once"
    return rows


def assert_clean(out, tmpdir):
    """Nothing a finished run should leave: staging, ledger, lease, temporary files, orphan maps."""
    out = Path(out)
    assert not list(out.rglob("_staging-*")) and not list(out.rglob("_ledger-*")) and not list(out.rglob(f"{LEASE_PREFIX}*"))
    assert not list(out.rglob(".tmp-*"))
    ids = {r["image_id"] for r in read_score_table(str(out)).to_pylist() if r["status"] == "ok"}
    for sub in ("maps", "masks"):
        assert {p.stem for p in out.glob(f"gallery=*/date=*/{sub}/*")} == ids, f"{sub}: one file per scored row"
    assert not list(Path(tmpdir).glob("spade-progress-*"))


def test_sigkill_then_rerun_resumes_committed_work(night, tmp_path):
    out, tmpdir = tmp_path / "nightly", tmp_path / "tmp"
    tmpdir.mkdir()
    first = spade_score(night, out, tmpdir)
    committed = wait_for_parts(first, out, 8)  # >= 16 of 30 inputs committed (units of 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    with pytest.raises(FileNotFoundError):
        read_score_table(str(out))  # readers see nothing of the killed run
    assert len(ledger_parts(out)) >= committed
    maps_dir = next(out.glob("gallery=*/date=*")) / "maps"
    (maps_dir / "0123456789abcdef.png").write_bytes(b"orphan of a killed run")
    (maps_dir / ".tmp-0000-0123456789abcdef.png").write_bytes(b"half-written")
    second = spade_score(night, out, tmpdir)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    rows = assert_one_row_per_input(out, night["inputs"])
    rescored = [r for r in rows if r["scored_at"] == max(row["scored_at"] for row in rows)]
    assert len(rescored) <= 0.6 * len(night["inputs"]), f"the re-run scored {len(rescored)} of {len(rows)}"
    assert all(r["status"] == "ok" for r in rows)
    assert_clean(out, tmpdir)
    third = spade_score(night, out, tmpdir)
    third.communicate(timeout=600)
    assert third.returncode == 0  # a no-op
    assert_one_row_per_input(out, night["inputs"])


def test_sigkill_during_fit_then_rerun_resumes_from_what_it_committed(tmp_path):
    """A `spade fit` killed after some units are committed: the same command extracts only the rest, and the gallery
    is the one an uninterrupted fit builds (same hash, images and thresholds)."""
    import yaml

    from spade.index.gallery import read_manifest
    from spade.io.samples import SampleSpec, write_sample_dataset
    from tests.conftest import TINY, plumbing_config

    data = write_sample_dataset(str(tmp_path / "data"), SampleSpec(size=64, train=40, test_good=0, test_per_defect=0))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(plumbing_config(**TINY).to_dict()))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()

    def fit(gallery):
        return spade_process(["fit", "--config", str(config), "--images", f"{data}/train/good", "--gallery",
                              str(gallery)], tmpdir, quiet=False)

    whole = fit(tmp_path / "whole")
    _, stderr = whole.communicate(timeout=600)
    assert whole.returncode == 0, stderr
    gallery = tmp_path / "killed"
    first = fit(gallery)
    deadline = time.monotonic() + 300
    while len(list(gallery.glob("_ledger-*/unit-*.parquet"))) < 8:  # of 20 units (2 images each)
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (gallery / "manifest.json").exists()
    second = fit(gallery)
    _, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    assert "resuming" in stderr
    resumed = int(stderr.split(" of them committed by an interrupted fit")[0].rsplit("; ", 1)[-1])
    assert resumed >= 16, stderr
    expected, got = read_manifest(str(tmp_path / "whole")), read_manifest(str(gallery))
    assert got["gallery_hash"] == expected["gallery_hash"] and got["num_images"] == 40
    for kind in ("image", "pixel"):
        assert got["thresholds"][kind] == pytest.approx(expected["thresholds"][kind], rel=1e-5)
    assert not list(gallery.glob("_ledger-*")) and not list(gallery.glob("_staging-*"))
    assert not list(gallery.glob(f"{LEASE_PREFIX}*"))


def test_two_runs_started_together_give_one_row_per_input(night, tmp_path):
    out, tmpdir = tmp_path / "nightly", tmp_path / "tmp"
    tmpdir.mkdir()
    runs = [spade_score(night, out, tmpdir), spade_score(night, out, tmpdir)]
    results = [run.communicate(timeout=600) + (run.returncode,) for run in runs]
    codes = sorted(code for _, _, code in results)
    assert codes in ([0, 0], [0, 75]), results
    for _, stderr, code in results:
        if code == 75:  # refused while the other held the lease: says who holds it and what to do
            assert "is being written by spade score" in stderr and "Wait for it to finish" in stderr
    assert_one_row_per_input(out, night["inputs"])
    assert_clean(out, tmpdir)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_exits_cleanly_with_one_line(night, tmp_path, signum, code):
    out, tmpdir = tmp_path / "nightly", tmp_path / "tmp"
    tmpdir.mkdir()
    run = spade_score(night, out, tmpdir)
    wait_for_parts(run, out, 1)
    started = time.monotonic()
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == code, stderr
    assert time.monotonic() - started < 30
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"spade score: interrupted by {signal.Signals(signum).name}") and "resume" in last
    assert not list(out.rglob("_staging-*")) and not list(out.rglob(f"{LEASE_PREFIX}*"))
    assert not list(tmpdir.glob("spade-*"))
    with pytest.raises(FileNotFoundError):
        read_score_table(str(out))
    assert ledger_parts(out), "committed units are kept for the next run"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lease_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path):
    folder = str(tmp_path / "partition")
    with RunLease(folder, "run-a", "spade score"):
        with pytest.raises(LeaseHeld, match=r"being written by spade score run-a \(pid %d" % os.getpid()):
            RunLease(folder, "run-b", "spade score").acquire()
    assert not lease_keys(folder)  # released
    for epoch, stale in enumerate(({"host": os.uname().nodename, "pid": dead_pid(), "run_id": "killed",
                                    "heartbeat": time.time()},
                                   {"host": "another-machine", "pid": 1, "run_id": "silent",
                                    "heartbeat": time.time() - 3600})):
        (tmp_path / "partition" / f"{LEASE_PREFIX}{epoch:010d}.json").write_text(json.dumps(stale))
        with RunLease(folder, "run-c", "spade score") as lease:
            assert [e for e, _ in lease_keys(folder)] == [epoch + 1]  # the next epoch; the stale one deleted
            assert json.loads(Path(lease.url).read_text())["run_id"] == "run-c"
    (tmp_path / "partition" / f"{LEASE_PREFIX}{7:010d}.json").write_text(
        json.dumps({"host": "another-machine", "pid": 1, "run_id": "busy", "heartbeat": time.time()}))
    with pytest.raises(LeaseHeld, match="busy"):
        RunLease(folder, "run-d", "spade score").acquire()


def test_lease_taken_over_is_noticed_before_publishing(tmp_path):
    folder = str(tmp_path / "partition")
    slow = RunLease(folder, "slow", "spade score", stale_after=0.2).acquire()
    time.sleep(0.3)
    slow_record = json.loads(Path(slow.url).read_text())
    slow_record["host"] = "another-machine"  # as seen from elsewhere: its heartbeat is old
    Path(slow.url).write_text(json.dumps(slow_record))
    with RunLease(folder, "fast", "spade score", stale_after=0.2):
        with pytest.raises(LeaseHeld, match="taken over"):
            slow.check()
    slow.release()


def test_tidy_removes_what_dead_runs_left_and_finishes_a_commit(tmp_path):
    scores = tmp_path / "scores"
    live, dead = (scores / f"{publication.SCRATCH_PREFIX}{name}" for name in ("live", "dead"))
    for folder in (live, dead):
        folder.mkdir(parents=True)
    (live / OWNER).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "run_id": "live",
                                          "heartbeat": time.time()}))
    (dead / OWNER).write_text(json.dumps({"host": os.uname().nodename, "pid": dead_pid(), "run_id": "dead",
                                          "heartbeat": time.time()}))
    storage.write_parquet(str(scores / "old-part-00000-of-00001.parquet"), storage_table("old"))
    publication.adopt(str(scores), "first")  # a folder written before commits: its files are the table
    assert read_parquet_names(scores) == ["old-part-00000-of-00001.parquet"]
    storage.write_parquet(str(scores / "killed-part-00000-of-00001.parquet"), storage_table("killed"))
    storage.write_parquet(str(scores / "run-part-00000-of-00001.parquet"), storage_table("run"))
    assert [Path(u).name for u in publication.table_files(str(scores))] == ["old-part-00000-of-00001.parquet"]
    ledger = tmp_path / "_ledger-x"
    ledger.mkdir()
    record = json.loads((scores / publication.COMMIT).read_text())
    record.update(files=record["files"] + ["run-part-00000-of-00001.parquet"], retire=[str(ledger)])
    (scores / publication.COMMIT).write_text(json.dumps(record))  # a run killed right after its commit
    removed = publication.tidy(str(scores), staging_is_live)
    assert sorted(Path(r).name for r in removed) == sorted([f"{publication.SCRATCH_PREFIX}dead", "_ledger-x",
                                                            "killed-part-00000-of-00001.parquet"])
    assert live.exists() and not dead.exists() and not ledger.exists()
    assert read_parquet_names(scores) == ["old-part-00000-of-00001.parquet", "run-part-00000-of-00001.parquet"]
    assert json.loads((scores / publication.COMMIT).read_text())["retire"] == []  # done once
    ledger.mkdir()
    publication.tidy(str(scores), staging_is_live)
    assert ledger.exists(), "a later run's ledger of the same name is not retired again"


def storage_table(name):
    import pyarrow as pa

    return pa.table({"uri": [name]})


def read_parquet_names(folder):
    return sorted(Path(p).name for p in publication.table_files(str(folder)))
