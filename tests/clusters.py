"""Real multi-process engine clusters for the cluster tests, on this one machine: a Flink session cluster (a
JobManager and two TaskManagers, each its own JVM, from the Flink distribution `scripts/fetch_engines.sh` unpacks)
and a Spark standalone cluster (a master and two workers, from the pyspark wheel's distribution), with Beam's job
server in front and the pipeline's Python work in EXTERNAL SDK worker pools: one pool per task manager / worker, as
on a cluster where each machine runs its own pool at the same address.

One machine has one ``localhost``, so each task manager / worker is given a host of its own for the pool's name:
every pool listens on its own loopback address (127.0.0.2, 127.0.0.3, ...) at the same port, and each JVM resolves
the pool's name (``spade-sdk-pool``) to its own pool's address through a hosts file of its own
(``-Djdk.net.hosts.file``). Beam's pool keys the workers it starts by their id, and two task managers number their
workers alike, so a pool shared by two of them stops the wrong worker: one per task manager is not only what a
cluster does, it is needed."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ENGINE_CACHE = Path(os.environ.get("SPADE_ENGINE_CACHE", Path.home() / ".cache" / "spade" / "engines"))
FLINK_VERSION, SPARK_VERSION = "1.19.0", "3.5.0"  # what Beam 2.62's flink-1.19 and spark-3 runners are built on
POOL_HOST = "spade-sdk-pool"
REPO = Path(__file__).resolve().parents[1]

POOL = """
import logging, sys
import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
from apache_beam.utils import thread_pool_executor
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                     options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)])
server.add_insecure_port(sys.argv[1])
beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(BeamFnExternalWorkerPoolServicer(use_process=True),
                                                                   server)
server.start()
logging.info("SDK worker pool listening at %s", sys.argv[1])
server.wait_for_termination()
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(check, what: str, processes: list[subprocess.Popen], logs: list[Path], timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process, log in zip(processes, logs):
            if process.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready within {timeout:.0f} s; logs: {', '.join(map(str, logs))}")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


class Cluster:
    """Processes started together and stopped together (by process group), their logs in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.pool_logs: list[Path] = []
        self.pool_port = free_port()

    def start(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=self.folder,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        self.processes.append(process)
        self.logs.append(log)
        return process

    def start_pool(self, index: int) -> Path:
        """SDK worker pool ``index`` at 127.0.0.<index+2>:<pool port>, and a hosts file naming it ``POOL_HOST``."""
        address = f"127.0.0.{index + 2}"
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.start(f"pool-{index}", [sys.executable, "-c", POOL, f"{address}:{self.pool_port}"], env)
        self.pool_logs.append(self.logs[-1])
        hosts = self.folder / f"hosts-{index}"
        hosts.write_text(f"127.0.0.1 localhost {socket.gethostname()}\n{address} {POOL_HOST}\n")
        wait_for(lambda: listening(address, self.pool_port), f"SDK worker pool {index}", self.processes, self.logs)
        return hosts

    def start_job_server(self, engine: str, jar: str, java_flags: list[str], master: str) -> None:
        """Beam's job server for ``engine``, submitting to the cluster at ``master`` (its flag and address)."""
        self.job_port = free_port()
        self.start("job-server", ["java", *java_flags, "-jar", jar, master, f"--job-port={self.job_port}",
                                  f"--artifact-port={free_port()}", f"--expansion-port={free_port()}"])
        wait_for(lambda: listening("127.0.0.1", self.job_port), f"Beam's {engine} job server", self.processes,
                 self.logs)

    @property
    def environment(self) -> list[str]:
        return ["--environment_type=EXTERNAL", f"--environment_config={POOL_HOST}:{self.pool_port}"]

    def workers_started(self) -> list[int]:
        """How many SDK workers each pool started (from the pools' own logs)."""
        return [log.read_text().count("Starting worker with command") for log in self.pool_logs]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, 15)
                except ProcessLookupError:
                    pass
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


def flink_home() -> Path | None:
    home = ENGINE_CACHE / f"flink-{FLINK_VERSION}"
    return home if (home / "lib" / f"flink-dist-{FLINK_VERSION}.jar").is_file() else None


def _bash_java_utils(home: Path, conf: Path, what: str) -> tuple[list[str], list[str]]:
    """Flink's own computation of a process's JVM options and memory settings (what its start scripts ask)."""
    out = subprocess.run(["java", "-cp", f"{home}/bin/bash-java-utils.jar:{home}/lib/*",
                          "org.apache.flink.runtime.util.bash.BashJavaUtils", what, "--configDir", str(conf)],
                         capture_output=True, text=True, check=True).stdout
    results = [line.split(":", 1)[1] for line in out.splitlines() if line.startswith("BASH_JAVA_UTILS_EXEC_RESULT:")]
    return results[0].split(), results[1].split()


JAVA_OPENS = ["--add-opens=java.base/java.util=ALL-UNNAMED", "--add-opens=java.base/java.lang=ALL-UNNAMED",
              "--add-opens=java.base/java.nio=ALL-UNNAMED", "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED"]


class FlinkSession(Cluster):
    """A Flink session cluster (JobManager + ``task_managers`` TaskManagers of one slot each, separate JVMs), an SDK
    worker pool per TaskManager, and Beam's Flink job server submitting to it; ``beam_args`` run a pipeline there."""

    def __init__(self, folder: Path, home: Path, job_server_jar: str, task_managers: int = 2):
        super().__init__(folder)
        self.home, self.jar, self.task_managers = home, job_server_jar, task_managers

    def start_all(self) -> "FlinkSession":
        conf = self.folder / "conf"
        conf.mkdir(exist_ok=True)
        rpc, rest = free_port(), free_port()
        self.rest = rest
        (conf / "config.yaml").write_text(json.dumps({
            "jobmanager.rpc.address": "localhost", "jobmanager.rpc.port": rpc, "jobmanager.bind-host": "localhost",
            "jobmanager.memory.process.size": "1024m", "taskmanager.bind-host": "localhost",
            "taskmanager.host": "localhost", "taskmanager.rpc.port": "0", "taskmanager.numberOfTaskSlots": 1,
            "taskmanager.memory.process.size": "1536m", "rest.port": rest, "rest.address": "localhost",
            "rest.bind-address": "localhost", "parallelism.default": self.task_managers}))  # JSON is YAML
        (conf / "log4j.properties").write_text(
            "rootLogger.level = INFO\nrootLogger.appenderRef.file.ref = Main\nappender.main.name = Main\n"
            "appender.main.type = Console\nappender.main.layout.type = PatternLayout\n"
            "appender.main.layout.pattern = %d %-5p %c{1} - %m%n\n")
        logging = [f"-Dlog4j.configurationFile=file:{conf / 'log4j.properties'}"]
        jvm, dynamic = _bash_java_utils(self.home, conf, "GET_JM_RESOURCE_PARAMS")
        self.start("jobmanager", ["java", *jvm, *JAVA_OPENS, *logging, "-cp", f"{self.home}/lib/*",
                                  "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
                                  "--configDir", str(conf), *dynamic])
        jvm, dynamic = _bash_java_utils(self.home, conf, "GET_TM_RESOURCE_PARAMS")
        for index in range(self.task_managers):
            hosts = self.start_pool(index)
            self.start(f"taskmanager-{index}", ["java", *jvm, f"-Djdk.net.hosts.file={hosts}", *JAVA_OPENS, *logging,
                                                "-cp", f"{self.home}/lib/*",
                                                "org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
                                                "--configDir", str(conf), *dynamic])
        wait_for(lambda: self.overview().get("taskmanagers") == self.task_managers, "Flink session cluster",
                 self.processes, self.logs)
        self.start_job_server("Flink", self.jar, [], f"--flink-master=localhost:{rest}")
        return self

    def overview(self) -> dict:
        return get_json(f"http://localhost:{self.rest}/overview")

    def ran_work(self) -> set[str]:
        """The TaskManagers that ran subtasks of the finished jobs (from the JobManager's REST API)."""
        api = f"http://localhost:{self.rest}/jobs"
        return {tm["taskmanager-id"] for job in get_json(api)["jobs"]
                for vertex in get_json(f"{api}/{job['id']}")["vertices"]
                for tm in get_json(f"{api}/{job['id']}/vertices/{vertex['id']}/taskmanagers")["taskmanagers"]}

    @property
    def beam_args(self) -> list[str]:
        return ["--runner=PortableRunner", f"--job_endpoint=localhost:{self.job_port}", *self.environment,
                f"--parallelism={self.task_managers}"]


def spark_home() -> Path | None:
    home = ENGINE_CACHE / f"spark-{SPARK_VERSION}"
    return home if (home / "jars" / f"spark-core_2.12-{SPARK_VERSION}.jar").is_file() else None


SPARK_OPENS = JAVA_OPENS + ["--add-opens=java.base/java.lang.invoke=ALL-UNNAMED",
                            "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
                            "--add-opens=java.base/java.net=ALL-UNNAMED", "--add-opens=java.base/java.io=ALL-UNNAMED",
                            "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED"]  # Spark 3.5 on Java 17


class SparkStandalone(Cluster):
    """A Spark standalone cluster (a master and ``workers`` workers of one core each, separate JVMs; each worker starts
    its executors as JVMs of their own), an SDK worker pool per worker, and Beam's Spark job server as the driver."""

    def __init__(self, folder: Path, home: Path, job_server_jar: str, workers: int = 2):
        super().__init__(folder)
        self.home, self.jar, self.workers = home, job_server_jar, workers

    def start_all(self) -> "SparkStandalone":
        port, self.ui = free_port(), free_port()
        self.master = f"spark://127.0.0.1:{port}"
        env = {"SPARK_HOME": str(self.home), "SPARK_SCALA_VERSION": "2.12"}
        classpath = ["-cp", f"{self.home}/jars/*"]
        self.start("master", ["java", "-Xmx512m", *SPARK_OPENS, *classpath, "org.apache.spark.deploy.master.Master",
                              "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(self.ui)], env)
        wait_for(lambda: listening("127.0.0.1", port), "Spark master", self.processes, self.logs)
        for index in range(self.workers):
            hosts = self.start_pool(index)
            work = self.folder / f"work-{index}"
            work.mkdir(exist_ok=True)
            # JAVA_TOOL_OPTIONS reaches the worker and the executor JVMs it starts: they resolve the pool's name to
            # this worker's own pool
            self.start(f"worker-{index}", ["java", "-Xmx512m", *SPARK_OPENS, *classpath,
                                           "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                           "--webui-port", "0", "--cores", "1", "--memory", "2g", "--work-dir", str(work),
                                           self.master],
                       {**env, "JAVA_TOOL_OPTIONS": f"-Djdk.net.hosts.file={hosts}"})
        wait_for(lambda: self.state().get("aliveworkers") == self.workers, "Spark standalone cluster", self.processes,
                 self.logs)
        self.start_job_server("Spark", self.jar, SPARK_OPENS, f"--spark-master-url={self.master}")
        return self

    def state(self) -> dict:
        return get_json(f"http://127.0.0.1:{self.ui}/json/")

    def ran_work(self) -> set[str]:
        """The workers that ran executors of the finished applications (their work folders, as Spark lays them out)."""
        return {path.parent.parent.name for path in self.folder.glob("work-*/app-*/*") if path.is_dir()}

    @property
    def beam_args(self) -> list[str]:
        return ["--runner=PortableRunner", f"--job_endpoint=localhost:{self.job_port}", *self.environment]

    def stop(self) -> None:
        """The processes stopped, and the job jar each executor was given (300 MB an application) removed; the
        executors' logs stay beside them."""
        super().stop()
        for jar in self.folder.glob("work-*/app-*/*/*.jar"):
            jar.unlink()


def java_available() -> bool:
    return shutil.which("java") is not None
