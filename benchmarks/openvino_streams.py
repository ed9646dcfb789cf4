"""The feature pass when several callers share one OpenVINO runtime: one stream (OpenVINO's latency hint, the
runtime until 2026-12-06) against `spade.features.runtime.streams_for`'s (a stream per caller the cores hold).

`spade score` runs two workers in one process on a two-core machine, each with one thread, and both extract
through one shared runtime. For each shared set, the first ``--images`` normal images, framed as the default
config frames them, are extracted by ``--callers`` threads at once (each its share of the batches), on a runtime
with one stream and on one with ``streams_for(threads)`` streams, each stream ``--threads`` / ``--callers``
threads, alternately, best of ``--repeats``. Prints per set the wall ms per image of each, their ratio and the
largest difference of any feature between them (0: a stream's arithmetic does not depend on the count), then

    RESULT streams_<set>=<one stream's ms / streams_for's> ... max_abs_diff=<largest>

    python benchmarks/openvino_streams.py [--images 32] [--repeats 3] [--threads 2] [--callers 2]
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from feature_pass import ROOT, alternate, options, result_line, shared_sets  # noqa: E402

sys.path.insert(0, str(ROOT))


def largest_difference(first: list, second: list) -> float:
    """The largest difference of any embedding or map value between two runtimes' outputs of the same batches."""
    return max(max(float(np.abs(a.numpy() - b.numpy()).max()) for a, b in [(one[0], two[0])] +
                   [(one[1][layer], two[1][layer]) for layer in one[1]])
               for one, two in zip(first, second))


def main() -> None:
    parser = options(__doc__, repeats=3)
    parser.add_argument("--callers", type=int, default=2, help="threads extracting at once through one runtime")
    parser.set_defaults(images=32)
    args = parser.parse_args()
    from spade.features import runtime
    from spade.features.backbone import FeatureExtractor

    threads = max(1, args.threads // args.callers)
    results, worst = [], 0.0
    for name, config, batch in shared_sets(args):
        shared = FeatureExtractor(config.replace(feature_runtime="openvino")).runtime
        ways = {label: runtime.OpenVinoRuntime(shared.net, shared.key, threads=threads, precision=config.feature_precision,
                                               streams=streams)
                for label, streams in (("one stream", 1), ("streams_for", runtime.streams_for(threads)))}
        step = config.batch_size
        batches = [batch[i:i + step] for i in range(0, batch.shape[0], step)]
        outputs = {}

        def together(extract, label):
            with ThreadPoolExecutor(args.callers) as pool:
                outputs[label] = list(pool.map(extract, batches))

        for label, extract in ways.items():
            together(extract, label)  # warm-up: compiles the model (the conversion is cached per machine)
        wall, _ = alternate({label: (lambda e=extract, l=label: together(e, l)) for label, extract in ways.items()},
                            args.repeats, batch.shape[0])
        diff = largest_difference(*outputs.values())
        worst = max(worst, diff)
        ratio = wall["one stream"] / wall["streams_for"]
        results.append((f"streams_{name}", ratio))
        print(f"{name}: frame {config.frame_size[0]}x{config.frame_size[1]}, {args.callers} callers x {threads} thread(s): "
              f"one stream {wall['one stream']:.1f} ms/image, {ways['streams_for'].streams} streams "
              f"{wall['streams_for']:.1f} ({ratio:.2f}x), max |diff| {diff:.1e}", flush=True)
    result_line(results, worst)


if __name__ == "__main__":
    main()
