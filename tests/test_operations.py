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

from spade.io import storage
from spade.io.lease import LEASE, OWNER, LeaseHeld, RunLease, staging_is_live
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
    assert not list(out.rglob("_staging-*")) and not list(out.rglob("_ledger-*")) and not list(out.rglob(LEASE))
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
    assert not list(out.rglob("_staging-*")) and not list(out.rglob(LEASE))
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
    assert not (tmp_path / "partition" / LEASE).exists()  # released
    lease_file = tmp_path / "partition" / LEASE
    for stale in ({"host": os.uname().nodename, "pid": dead_pid(), "run_id": "killed", "heartbeat": time.time()},
                  {"host": "another-machine", "pid": 1, "run_id": "silent", "heartbeat": time.time() - 3600}):
        lease_file.write_text(json.dumps(stale))
        with RunLease(folder, "run-c", "spade score"):
            assert json.loads(lease_file.read_text())["run_id"] == "run-c"
    lease_file.write_text(json.dumps({"host": "another-machine", "pid": 1, "run_id": "busy", "heartbeat": time.time()}))
    with pytest.raises(LeaseHeld, match="busy"):
        RunLease(folder, "run-d", "spade score").acquire()


def test_stale_staging_cleanup_spares_live_runs_and_finishes_publications(tmp_path):
    scores = tmp_path / "scores"
    live, dead, publishing = (scores / f"_staging-{name}" for name in ("live", "dead", "publishing"))
    for folder in (live, dead, publishing):
        folder.mkdir(parents=True)
        storage.write_parquet(str(folder / "part-00000-of-00001.parquet"), storage_table(folder.name))
    (live / OWNER).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "run_id": "live",
                                          "heartbeat": time.time()}))
    (dead / OWNER).write_text(json.dumps({"host": os.uname().nodename, "pid": dead_pid(), "run_id": "dead",
                                          "heartbeat": time.time()}))
    ledger = tmp_path / "_ledger-x"
    ledger.mkdir()
    plan = {"folder": str(scores), "replace": False, "then_remove": [str(ledger)],
            "moves": [[str(publishing / "part-00000-of-00001.parquet"), str(scores / "run-part-0.parquet")]]}
    (publishing / storage.PUBLISH_PLAN).write_text(json.dumps(plan))
    removed = storage.remove_stale_staging(str(scores), staging_is_live)
    assert sorted(Path(r).name for r in removed) == ["_staging-dead", "_staging-publishing"]
    assert live.exists() and not dead.exists() and not publishing.exists() and not ledger.exists()
    assert read_parquet_names(scores) == ["run-part-0.parquet"]


def storage_table(name):
    import pyarrow as pa

    return pa.table({"uri": [name]})


def read_parquet_names(folder):
    return sorted(Path(p).name for p in storage.list_files(str(folder), ".parquet"))
