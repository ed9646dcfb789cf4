"""Real object-store servers for the object-store tests, each in a process of its own on free local ports: an S3
server, SeaweedFS (`weed server -s3`, built by scripts/build_seaweedfs.sh), with a throw-away data folder; a GCS
server, fake-gcs-server (built by scripts/build_fake_gcs.sh), in memory; and a counting TCP proxy (what a client
really downloads)."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

# SeaweedFS's volume server turns read-only below 1 % free disk by default: on a large, mostly full disk that is
# gigabytes these tests never need (they write a few megabytes), and every write then hangs
MIN_FREE_SPACE = "256MiB"
CACHE = Path(os.environ.get("SPADE_STORE_CACHE", Path.home() / ".cache" / "spade"))
BUILD_HINT = ("SeaweedFS is not built: run `scripts/build_seaweedfs.sh ~/.cache/spade/seaweedfs` (needs the Go "
              "toolchain and the Go module proxy; .ci/run does it)")
GCS_BUILD_HINT = ("fake-gcs-server is not built: run `scripts/build_fake_gcs.sh ~/.cache/spade/fake-gcs` (needs the "
                  "Go toolchain and the Go module proxy; .ci/run does it)")


def cached_binary(folder: str, prefix: str) -> str | None:
    """The newest cached build ``CACHE/folder/prefix*``, None when there is none."""
    found = sorted(glob.glob(str(CACHE / folder / f"{prefix}*")))
    return next((path for path in reversed(found) if os.access(path, os.X_OK) and not path.endswith(".tmp")), None)


def weed_binary() -> str | None:
    return cached_binary("seaweedfs", "weed-")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedS3:
    """`weed server` (master, volume, filer, S3 gateway) on 127.0.0.1; ``endpoint`` is its S3 URL. Anonymous access
    (no identities configured), which s3fs reaches with any keys."""

    def __init__(self, binary: str, folder: Path):
        self.binary, self.folder = binary, folder
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 90.0) -> "SeaweedS3":
        self.folder.mkdir(parents=True, exist_ok=True)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        # the gRPC ports are given: by default they are the HTTP port + 10000, which may be taken. Each bucket is a
        # collection that grows 7 volumes at a time (sparse files of at most 64 MB): room for many buckets
        command = [self.binary, f"-logdir={self.folder}", "server", f"-dir={self.folder}", "-ip=127.0.0.1",
                   "-ip.bind=127.0.0.1", f"-master.port={master}", f"-master.port.grpc={master_grpc}",
                   f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-filer", f"-filer.port={filer}",
                   f"-filer.port.grpc={filer_grpc}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=1000",
                   "-master.telemetry=false", f"-volume.minFreeSpace={MIN_FREE_SPACE}"]
        self.log = open(self.folder / "weed.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder,
                                        start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{s3}"
        self._wait_writable(timeout)
        return self

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a process needs to reach the server through s3fs/botocore."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": "spade",
                "AWS_SECRET_ACCESS_KEY": "spade-secret", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self, endpoint: str | None = None, **config):
        """An s3fs client of the server; ``config`` goes to botocore's Config (timeouts, retries)."""
        import s3fs

        env = self.env(endpoint)
        return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=env["AWS_ENDPOINT_URL"], use_listings_cache=False,
                                 skip_instance_cache=True, config_kwargs=config or None)

    def new_bucket(self) -> str:
        name = f"spade-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name

    def _wait_writable(self, timeout: float) -> None:
        """Until a bucket can be made and an object written (the volume server joins the master a few seconds in).
        Each try is bounded (botocore and s3fs would otherwise retry a hung write for minutes), so the deadline
        holds; a server that never becomes writable fails with the lines of its log that say why."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                fs = self.filesystem(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})
                fs.retries = 1
                fs.mkdir("spade-ready")
                fs.pipe_file("spade-ready/probe", b"ok")
                if fs.cat_file("spade-ready/probe") == b"ok":
                    return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.5)
        warnings = self._log_warnings()
        self.stop()
        raise RuntimeError(f"weed server not writable within {timeout:.0f}s ({last!r}); its log's warnings and "
                           f"errors (a volume below -volume.minFreeSpace={MIN_FREE_SPACE} of free disk is read-only: "
                           f"free some disk):\n{warnings}")

    def _log_warnings(self, lines: int = 20) -> str:
        """The last warnings and errors of weed.log, and its disk-space complaints (the folder goes with stop())."""
        said = [line for line in self._log_lines() if line[:1] in "WEF" or "disk free" in line]
        return "\n".join(said[-lines:]) or "(none)"

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self._log_lines()[-lines:])

    def _log_lines(self) -> list[str]:
        self.log.flush()
        return (self.folder / "weed.log").read_text(errors="replace").splitlines()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class FakeGcs:
    """fake-gcs-server (the GCS JSON API, in memory) on 127.0.0.1; gcsfs reaches it through STORAGE_EMULATOR_HOST."""

    def __init__(self, binary: str, folder: Path):
        self.binary, self.folder = binary, folder
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "FakeGcs":
        self.folder.mkdir(parents=True, exist_ok=True)
        port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = open(self.folder / "fake-gcs.log", "w")
        self.process = subprocess.Popen([self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                         "-backend", "memory", "-public-host", f"127.0.0.1:{port}"],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"fake-gcs-server did not start; see {self.folder / 'fake-gcs.log'}")

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def new_bucket(self) -> str:
        import gcsfs

        name = f"spade-{uuid.uuid4().hex[:12]}"
        gcsfs.GCSFileSystem(token="anon", endpoint_url=self.endpoint, skip_instance_cache=True).mkdir(name)
        return name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.log.close()


class CountingProxy:
    """A TCP proxy to ``upstream`` (host, port) that counts the bytes the upstream sends back: what its clients
    download."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.downloaded = 0
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if count:
                    with self._lock:
                        self.downloaded += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._server.close()
