"""Parquet through fsspec: round trips, and processes that read Parquet exit cleanly."""
import os
import subprocess
import sys
import textwrap

import pyarrow as pa

from spade.io import storage


def table():
    return pa.table({"uri": [f"img-{i}.png" for i in range(300)], "status": ["ok", "error", "ok"] * 100})


def test_parquet_round_trip_local_and_remote(tmp_path):
    for url in (str(tmp_path / "scores" / "part-0.parquet"), "memory://spade-test-storage/scores/part-0.parquet"):
        storage.write_parquet(url, table())
        assert storage.read_parquet([url, url], columns=["status"]).column("status").to_pylist() == \
            table().column("status").to_pylist() * 2


def test_parquet_is_read_from_a_local_path_never_a_python_file_object(tmp_path):
    """Arrow releases a Python file object on its own threads; at interpreter exit that aborts the process."""
    local = str(tmp_path / "t.parquet")
    remote = "memory://spade-test-storage/t.parquet"
    for url in (local, remote):
        storage.write_parquet(url, table())
    with storage.local_copy(local) as path:
        assert path == local
    with storage.local_copy(remote) as path:
        assert os.path.isfile(path)
        assert open(path, "rb").read() == storage.read_bytes(remote)
    assert not os.path.exists(path)  # the temporary copy is gone


def test_reading_parquet_then_exiting_never_aborts(tmp_path):
    """Handing pq.read_table an fsspec file made about one such process in five abort at exit
    ("terminate called without an active exception", exit 134) after all its work was done; twenty
    clean exits in a row would happen by chance about once in seventy runs."""
    path = tmp_path / "t.parquet"
    storage.write_parquet(str(path), table())
    script = textwrap.dedent(f"""
        from spade.io import storage
        for _ in range(3):
            storage.read_parquet([{str(path)!r}], columns=["uri", "status"])
    """)
    failures = []
    for _ in range(20):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            failures.append((run.returncode, run.stderr[-300:]))
    assert not failures, failures
