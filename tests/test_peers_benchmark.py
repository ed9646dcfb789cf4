"""benchmarks/peers.py's workers: every tool gets the same environment, the allocator setting included."""
from benchmarks import peers


def test_every_worker_gets_the_steady_allocator_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = peers.worker_env(system_malloc=False)
    assert env["GLIBC_TUNABLES"] == peers.STEADY_MALLOC
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert "GLIBC_TUNABLES" not in peers.worker_env(system_malloc=True)


def test_a_callers_own_allocator_setting_is_kept(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    assert peers.worker_env(system_malloc=False)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1"
