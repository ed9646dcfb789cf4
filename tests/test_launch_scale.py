"""Nothing on the launcher grows with the archive: inputs are listed on workers, the job graph holds the spec only."""
import multiprocessing
import os
import tarfile
from pathlib import Path

import fsspec
import pytest
from apache_beam.metrics.execution import MetricKey, MetricResult
from apache_beam.metrics.metricbase import MetricName

from spade.io.cache import cached_folder
from spade.io.listing import InputsMissing, check_spec, list_part, plan_listing, split_part
from spade.io.sources import expand_images
from pipelines.cli import main
from pipelines.fit import run_fit
from pipelines.options import refuse_local_paths, runner_is_remote
from pipelines.progress import ProgressReporter, counter_value
from pipelines.runner import JobSubmitted
from pipelines.score import Nightly, run_score
from tests.conftest import BEAM_ARGS, plumbing_config
from transforms.inputs import SPLIT_LEVELS, ListInputs

GRAPH_ONLY = ["--runner=pipelines.runner.GraphOnlyRunner"]


def split_down(parts, levels: int = SPLIT_LEVELS):
    """What `ListInputs` does to the planned parts on workers: `split_part`, level by level."""
    for _ in range(levels):
        parts = [piece for part in parts for piece in split_part(part)]
    return parts


def listed_by_parts(spec: str, split: str | None = None) -> list[str]:
    for parts in (plan_listing(spec, split), split_down(plan_listing(spec, split))):
        found = [uri for part in parts for uri in list_part(part)]
        assert len(found) == len(set(found)), "listing parts overlap"
    return sorted(found)


@pytest.fixture()
def archive(tmp_path):
    """A date-partitioned archive with nesting, hidden files, an MVTec-like category and a tar shard."""
    for rel in ["2026-11-27/a.png", "2026-11-27/cam1/b.png", "2026-11-28/c.png", "2026-11-28/.hidden.png",
                "top.png", "notes.txt", "cat/train/good/t.png", "cat/test/good/g.png", "cat/test/crack/k.png",
                "cat/ground_truth/crack/k_mask.png", "other/x/ground_truth/m.png", "other/x/y.png"]:
        path = tmp_path / "archive" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    with tarfile.open(tmp_path / "archive" / "shard-0.tar", "w") as tar:
        tar.add(tmp_path / "archive" / "top.png", arcname="top.png")
    return tmp_path / "archive"


@pytest.mark.parametrize("spec", ["", "/**/*.png", "/2026-*/*.png", "/2026-*/**", "/*.png", "/*.tar", "/top.png",
                                  "/cat", "/2026-11-27", "/other", "/**/cam1/*.png"])
def test_listing_parts_list_exactly_what_expand_images_lists(archive, spec):
    for split in (None, "train", "test"):
        assert listed_by_parts(f"{archive}{spec}", split) == expand_images(f"{archive}{spec}", split)
    assert listed_by_parts(f"file://{archive}{spec}") == expand_images(f"file://{archive}{spec}")


def test_listing_splits_per_folder_and_needs_one_listing_to_plan(archive):
    parts = plan_listing(f"{archive}/**/*.png")
    assert sorted(p.path for p in parts) == sorted([f"{archive}/*.png"] + [f"{archive}/{d}/**/*.png" for d in
                                                   ("2026-11-27", "2026-11-28", "cat", "other")])
    assert len(plan_listing(str(archive))) == 1 + 4  # the root's own files + one part per sub-folder
    fs = fsspec.filesystem("memory")
    for i in range(30):
        fs.pipe(f"/listing-test/day{i % 3}/{i:03d}.png", b"x")
    assert listed_by_parts("memory://listing-test/**/*.png") == expand_images("memory://listing-test/**/*.png")
    assert len(plan_listing("memory://listing-test")) == 4


def test_deep_partitions_are_listed_in_parts_of_one_leaf_folder(tmp_path):
    """line=/camera=/date=/hour=: the root's children are only the lines; workers split further, so each part lists
    one hour's folder, and the batches hold exactly what `expand_images` lists."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    root = tmp_path / "plant"
    hours = [f"line={line}/camera={camera}/date=2026-12-0{day}/hour={hour:02d}" for line in ("L1", "L2")
             for camera in ("top", "side") for day in (1, 2) for hour in (6, 7, 8)]
    for folder in hours:
        for i in range(3):
            path = root / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    (root / "line=L1" / "camera=top" / "ground_truth").mkdir()
    (root / "line=L1" / "camera=top" / "ground_truth" / "m.png").write_bytes(b"x")
    (root / "line=L1" / "stray.png").write_bytes(b"x")
    planned = plan_listing(str(root))
    assert len(planned) == 1 + 2  # the root's own files + one part per line: the launcher lists one folder
    parts = split_down(planned)
    leaves = [p for p in parts if p.kind == "find"]
    assert sorted(p.path for p in leaves) == sorted(str(root / h) for h in hours)  # 24 parts of 3 images each
    assert max(len(list_part(p)) for p in parts) == 3
    assert listed_by_parts(str(root)) == expand_images(str(root))
    with beam.Pipeline(argv=BEAM_ARGS) as pipeline:
        batches, _ = pipeline | ListInputs(str(root), None, batch_size=2)
        uris = batches | beam.FlatMap(lambda batch: batch[1])
        assert_that(uris, equal_to(expand_images(str(root))))


def test_missing_inputs_are_refused_cheaply(tmp_path):
    for spec in (str(tmp_path / "nope"), f"{tmp_path}/nope/**/*.png", "memory://nothing-here/*.png"):
        with pytest.raises(InputsMissing, match="matches nothing"):
            check_spec(spec)
    check_spec(f"{tmp_path}/*.png")  # the folder exists: workers will find out whether anything matches


def _tiny_inputs(root: str, count: int) -> str:
    fs = fsspec.filesystem("memory")
    for i in range(count):
        fs.pipe(f"/{root}/day={i % 10}/{i:06d}.png", b"")
    return f"memory://{root}"


def _graph_bytes(launch) -> int:
    with pytest.raises(JobSubmitted) as submitted:
        launch()
    return submitted.value.graph_bytes


def test_job_graph_does_not_grow_with_the_inputs(sample_root, tmp_path):
    """The serialized fit and score pipelines for 10 and 10,000 inputs differ by < 10 % (they hold the spec only)."""
    config = plumbing_config(calibration_images=2)
    gallery = str(tmp_path / "gallery")
    run_fit(config, f"{sample_root}/train/good", gallery, BEAM_ARGS)
    sizes = {}
    for count in (10, 10_000):
        images = _tiny_inputs(f"graph-{count}", count)
        sizes["fit", count] = _graph_bytes(lambda: run_fit(config, images, str(tmp_path / "g2"), GRAPH_ONLY))
        sizes["score", count] = _graph_bytes(lambda: run_score(config, gallery, images, str(tmp_path / "o"), GRAPH_ONLY))
        sizes["nightly", count] = _graph_bytes(lambda: run_score(config, gallery, images, str(tmp_path / "n"), GRAPH_ONLY,
                                                                 nightly=Nightly(day="2026-11-28", since="2026-11-01")))
    for what in ("fit", "score", "nightly"):
        small, large = sizes[what, 10], sizes[what, 10_000]
        assert abs(large - small) / small < 0.10, (what, small, large)


def test_metrics_without_committed_values():
    """Portable runners report only attempted metrics (committed is None): counted, not a crash."""
    key = MetricKey("step", MetricName("spade", "images_read"))
    assert counter_value(MetricResult(key, None, 7)) == 7
    assert counter_value(MetricResult(key, 5, 7)) == 5
    assert counter_value(MetricResult(key, None, None)) == 0


class _RunningJob:
    def __init__(self, done, total, committed=True):
        self.values = {"progress_done": done, "progress_total": total}
        self.committed = committed

    def metrics(self):
        job = self

        class Query:
            def query(self, _filter):
                return {"counters": [MetricResult(MetricKey("s", MetricName("spade", name)),
                                                  value if job.committed else None, value)
                                     for name, value in job.values.items()]}

        return Query()


def test_progress_comes_from_metrics_on_remote_runners():
    lines = []
    with ProgressReporter("score", lines.append, interval=0.05) as progress:
        assert progress.counts() == (0, 0)
        progress.watch(_RunningJob(40, 83, committed=False))
        assert progress.counts() == (40, 83)
        assert progress.line().startswith("score: 40/83 images")
        import time

        time.sleep(0.3)
    assert any(line.startswith("score: 40/83 images") for line in lines)


@pytest.mark.parametrize("args,remote", [
    (["--runner=FnApiRunner"], False),
    (["--runner=DaskRunner"], False),
    (["--runner=DaskRunner", "--dask_client_address=tcp://10.0.0.5:8786"], True),
    (["--runner=DataflowRunner", "--project=p", "--region=r"], True),
    (["--runner=FlinkRunner", "--flink_master=[local]", "--environment_type=LOOPBACK"], False),
    (["--runner=SparkRunner", "--spark_master_url=local[2]", "--environment_type=LOOPBACK"], False),
    (["--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=EXTERNAL",
      "--environment_config=localhost:50000"], False),
    (["--runner=FlinkRunner", "--flink_master=flink-jm:8081", "--environment_type=DOCKER"], True),
    (["--runner=PortableRunner", "--job_endpoint=jobs.example:8099", "--environment_type=LOOPBACK"], True),
])
def test_which_runners_are_remote(args, remote):
    assert runner_is_remote(args) is remote


def test_remote_runner_with_local_paths_stops_at_once(tmp_path, capsys):
    args = ["--runner=FlinkRunner", "--flink_master=flink-jm:8081", "--environment_type=DOCKER"]
    with pytest.raises(ValueError, match="use a shared URL"):
        refuse_local_paths(args, gallery=str(tmp_path / "g"), out="gs://bucket/out")
    refuse_local_paths(args, gallery="gs://bucket/g", out="file:///mnt/shared/out")
    refuse_local_paths(["--runner=FnApiRunner"], gallery=str(tmp_path / "g"))
    code = main(["fit", "--images", str(tmp_path), "--gallery", str(tmp_path / "g"), "--weights", "random", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert "--gallery" in err and "use a shared URL" in err and "gs://" in err
    assert not (tmp_path / "g").exists()


def _fill(args):
    cache, calls, key = args
    def fetch(name, target):
        with open(calls, "a") as handle:
            handle.write(f"{os.getpid()} {name}\n")
        Path(target).write_text(name)
    return cached_folder(key, ["a.npy", "pyramid/b.npy"], fetch, cache)


def test_gallery_cache_is_filled_once_atomically(tmp_path):
    cache, calls = str(tmp_path / "cache"), str(tmp_path / "calls.txt")
    os.makedirs(cache)
    stale = Path(cache) / ".tmp-g1-killed"  # what a filler killed midway leaves
    (stale / "pyramid").mkdir(parents=True)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        roots = pool.map(_fill, [(cache, calls, "g1")] * 4)
    assert len(set(roots)) == 1 and (Path(roots[0]) / "pyramid" / "b.npy").read_text() == "pyramid/b.npy"
    assert len(Path(calls).read_text().splitlines()) == 2  # one filler, each file fetched once
    assert not stale.exists() and not any(p.name.startswith(".tmp-") for p in Path(cache).iterdir())

    def broken(name, target):
        raise OSError("storage went away")

    with pytest.raises(OSError):
        cached_folder("g2", ["a.npy"], broken, cache)
    assert not (Path(cache) / "g2").exists() and not any(p.name.startswith(".tmp-") for p in Path(cache).iterdir())


def test_runner_profiles_load_and_production_ones_refuse_local_paths(tmp_path):
    from pipelines.options import load_runner_profile

    profiles = {p.stem: load_runner_profile(str(p)) for p in (Path(__file__).resolve().parents[1] / "configs" / "runners").glob("*.yaml")}
    assert {"flink-local", "spark-local", "portable-external", "flink", "spark", "dataflow", "direct", "dask"} <= set(profiles)
    assert {name for name, args in profiles.items() if runner_is_remote(args)} == {"flink", "spark", "dataflow",
                                                                                "flink-cluster", "spark-cluster"}
    for name in ("flink", "spark"):
        assert any(a.startswith("--sdk_container_image=") for a in profiles[name])
        with pytest.raises(ValueError, match="shared URL"):
            refuse_local_paths(profiles[name], out=str(tmp_path))


def test_sharded_pyramid_reads_rows_from_whichever_shard_holds_them(tmp_path):
    import numpy as np

    from spade.index.pyramid import ShardedLayer
    from spade.scoring.correspondence import PyramidReader

    rng = np.random.default_rng(0)
    blocks = [rng.random((n, 6, 3), dtype=np.float32).astype(np.float16) for n in (4, 1, 3)]
    paths = []
    for i, block in enumerate(blocks):
        paths.append(str(tmp_path / f"s{i}.npy"))
        np.save(paths[-1], block)
    stacked = np.concatenate(blocks)
    order = rng.permutation(len(stacked))  # gallery rows in another order than the shards'
    shards = np.repeat(np.arange(3), [4, 1, 3])[order]
    rows = np.concatenate([np.arange(n) for n in (4, 1, 3)])[order]
    layer = ShardedLayer(paths, shards, rows)
    expected = stacked[order]
    assert layer.shape == expected.shape and layer.dtype == np.float16
    np.testing.assert_array_equal(layer[5], expected[5])
    np.testing.assert_array_equal(layer[np.array([7, 0, 3])], expected[[7, 0, 3]])
    np.testing.assert_array_equal(np.asarray(layer), expected)
    out = np.empty((8, 6, 3), dtype=np.float32)
    with PyramidReader(layer) as reader:
        np.testing.assert_array_equal(reader.read(np.array([2, 6, 1]), out), expected[[2, 6, 1]].astype(np.float32))
    with pytest.raises(ValueError, match="past the end"):
        ShardedLayer(paths, shards, rows + 3)


def _recorded_jobs(monkeypatch, module, name: str) -> list:
    """The jobs ``module.name(job, lease, say)`` begins from now on, in order (the function itself still runs)."""
    jobs, original = [], getattr(module, name)

    def begin(job, lease, say):
        original(job, lease, say)
        jobs.append(job)

    monkeypatch.setattr(module, name, begin)
    return jobs


def test_a_first_run_leaves_the_earlier_runs_branches_out_of_its_graph(sample_root, tmp_path, monkeypatch):
    """Leaving out inputs earlier runs did and joining rows interrupted runs committed are branches of the graph (a
    fixed cost of every run); a run whose out folder holds no ledger and no earlier night has none of that to do, and
    its graph leaves them out. A leftover ledger (an interrupted run's) puts them back; their results are tested in
    test_operations (a killed run's committed units resumed, a night's scored inputs skipped). A nightly run keeps
    them: its partitions sit under the root whose earlier nights it leaves out."""
    import pipelines.score as score_module

    config = plumbing_config(calibration_images=2)
    gallery = str(tmp_path / "gallery")
    run_fit(config, f"{sample_root}/train/good", gallery, BEAM_ARGS)
    images = _tiny_inputs("first-run", 10)
    jobs = _recorded_jobs(monkeypatch, score_module, "begin_job")
    launch = lambda: _graph_bytes(lambda: run_score(config, gallery, images, str(tmp_path / "o"), GRAPH_ONLY))  # noqa: E731
    first = launch()
    assert not jobs[-1].earlier
    again = launch()
    assert not jobs[-1].earlier and abs(again - first) < 0.01 * first  # a launch leaves nothing that counts as earlier work
    os.makedirs(jobs[-1].ledger)  # what an interrupted run leaves: its ledger
    interrupted = launch()
    assert jobs[-1].earlier and interrupted > 1.1 * first, (first, interrupted)
    nightly = _graph_bytes(lambda: run_score(config, gallery, images, str(tmp_path / "n"), GRAPH_ONLY,
                                             nightly=Nightly(day="2026-11-28")))
    assert jobs[-1].earlier and nightly > 1.1 * first


def test_a_fit_that_neither_resumes_nor_appends_leaves_those_branches_out_of_its_graph(sample_root, tmp_path, monkeypatch):
    """The fit's twin of the score run's: leaving out inputs the gallery holds (``--append``) or an interrupted fit
    committed, and joining the rows it committed, are graph branches only a fit that appends or resumes needs. A
    leftover ledger puts the join back, ``--append`` the leaving out; their results are tested in test_operations
    (a killed fit resumed) and test_pipelines (appending)."""
    import pipelines.fit as fit_module

    config = plumbing_config(calibration_images=2)
    images = _tiny_inputs("first-fit", 10)
    jobs = _recorded_jobs(monkeypatch, fit_module, "begin_fit_job")
    launch = lambda **kw: _graph_bytes(lambda: run_fit(config, images, str(tmp_path / "g"), GRAPH_ONLY, **kw))  # noqa: E731
    first = launch()
    assert not jobs[-1].resuming
    again = launch()
    assert not jobs[-1].resuming and abs(again - first) < 0.01 * first  # a launch leaves nothing to resume
    os.makedirs(jobs[-1].ledger)  # what an interrupted fit leaves: its ledger
    resumed = launch()
    assert jobs[-1].resuming and resumed > 1.1 * first, (first, resumed)
    gallery = str(tmp_path / "fitted")
    run_fit(config, f"{sample_root}/train/good", gallery, BEAM_ARGS)
    fresh = _graph_bytes(lambda: run_fit(config, images, str(tmp_path / "h"), GRAPH_ONLY))
    appended = _graph_bytes(lambda: run_fit(config, images, gallery, GRAPH_ONLY, append=True))
    assert not jobs[-1].resuming and appended > 1.02 * fresh, (fresh, appended)
