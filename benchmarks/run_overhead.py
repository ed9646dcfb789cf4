"""What a scoring run pays besides its images: the fixed cost of `spade score` (graph construction, the runner's
stages) against the cost per image, as shipped (`pipelines.options.BeamOptions`, each view made once; Beam's reads of
DoFn signatures kept per function, `pipelines.signatures`), with the views but Beam's own signature reads ("views"),
and as before both (plain ``PipelineOptions``: every view parses every option again).

Fits a gallery of ``--data``'s training images with ``--config``, then alternately, ``--rounds`` times after a
warm-up round, runs the whole `run_score` call (local FnApiRunner) on one test image and on the whole test split,
with each kind of options. Prints the medians (graph construction: from the pipeline's creation to its ``run()``)
and

    RESULT build_speedup=<before / shipped> fixed_s=<one-image run, shipped> per_image_ms=<(all - one) / (n - 1)>
           fixed_share=<fixed / all-image run> run_speedup=<all-image run, before / shipped>
           signatures_fixed_speedup=<one-image run, views / shipped> signatures_run_speedup=<all-image run, views / shipped>

    python benchmarks/run_overhead.py [--data ../shared/data/mpdd_metal_plate] [--config configs/approximate.yaml]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA / "mpdd_metal_plate"), help="an MVTec-layout folder")
    parser.add_argument("--config", default=str(ROOT / "configs" / "approximate.yaml"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    import apache_beam.transforms.core as beam_core

    import pipelines.options as options_module
    import pipelines.runner as runner_module
    import pipelines.signatures as signatures
    from pipelines.fit import run_fit
    from pipelines.score import run_score
    from spade.config import load_config
    from spade.io.sources import expand_images

    config = load_config(args.config)
    shipped = options_module.beam_options
    plain = lambda beam_args: PipelineOptions(shipped(beam_args)._flags)  # noqa: E731
    kinds = {"before": (plain, False), "views": (shipped, False), "shipped": (shipped, True)}  # options, kept signatures
    marks: dict[str, float] = {}
    create, run = beam.Pipeline.__init__, beam.Pipeline.run

    def timed_create(self, *a, **k):
        create(self, *a, **k)
        marks["created"] = time.perf_counter()

    def timed_run(self, *a, **k):
        marks["built"] = time.perf_counter()
        return run(self, *a, **k)

    beam.Pipeline.__init__, beam.Pipeline.run = timed_create, timed_run
    tests = expand_images(args.data, split="test")
    with tempfile.TemporaryDirectory(prefix="spade-overhead-") as work:
        one = os.path.join(work, "one", "good")
        os.makedirs(one)
        shutil.copy(tests[0], one)
        gallery = os.path.join(work, "gallery")
        run_fit(config, args.data, gallery, [], lambda m: None)
        times = {(kind, size): [] for kind in kinds for size in ("one", "all")}
        builds = {kind: [] for kind in kinds}
        for rnd in range(args.rounds + 1):
            for kind, (make, kept) in kinds.items():
                runner_module.beam_options = make
                runner_module.keep_signatures = signatures.install if kept else (lambda: False)
                beam_core.get_signature = signatures.kept_signature if kept else signatures._BEAMS
                for size, images in (("one", os.path.dirname(one)), ("all", args.data)):
                    started = time.perf_counter()
                    run_score(config, gallery, images, os.path.join(work, f"out-{rnd}-{kind}-{size}"), [], lambda m: None)
                    if rnd:
                        times[kind, size].append(time.perf_counter() - started)
                        builds[kind].append(marks["built"] - marks["created"])
        runner_module.beam_options = shipped
        runner_module.keep_signatures = signatures.install
    med = {key: statistics.median(values) for key, values in times.items()}
    build = {kind: statistics.median(values) for kind, values in builds.items()}
    n = len(tests)
    for kind in kinds:
        print(f"{kind}: graph construction {build[kind]:.3f} s, one image {med[kind, 'one']:.3f} s, {n} images "
              f"{med[kind, 'all']:.3f} s (medians of {args.rounds})")
    fixed, every = med["shipped", "one"], med["shipped", "all"]
    print(f"{Path(args.data).name}, {Path(args.config).name}, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"RESULT build_speedup={build['before'] / build['shipped']:.2f} fixed_s={fixed:.3f} "
          f"per_image_ms={(every - fixed) / max(n - 1, 1) * 1000:.1f} fixed_share={fixed / every:.2f} "
          f"run_speedup={med['before', 'all'] / every:.3f} "
          f"signatures_fixed_speedup={med['views', 'one'] / fixed:.2f} signatures_run_speedup={med['views', 'all'] / every:.3f}")


if __name__ == "__main__":
    main()
