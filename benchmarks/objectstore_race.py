"""Two `spade score --date` runs started together against the same night in S3, N times: one must score, the other
exit 75 (busy), every time; and the night's table must hold one row per input after each pair.

Starts SeaweedFS's S3 server (built by scripts/build_seaweedfs.sh; `tests.objectstores`), writes a small archive and
fits a tiny gallery there once, then for each try starts two `spade score` processes at the same moment into a fresh
--out. Prints one line per try and

    RESULT tries=<N> one_busy=<tries with exit codes 0 and 75> rows_ok=<tries with one row per input>

    python benchmarks/objectstore_race.py [--tries 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spade.io.results import read_score_table  # noqa: E402
from spade.io.samples import SampleSpec, write_sample_dataset  # noqa: E402
from tests.conftest import TINY, plumbing_config  # noqa: E402
from tests.objectstores import BUILD_HINT, SeaweedS3, weed_binary  # noqa: E402


def spade(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--quiet", *args, "--runner=FnApiRunner"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=20)
    args = parser.parse_args()
    binary = weed_binary()
    if binary is None:
        sys.exit(BUILD_HINT)
    with tempfile.TemporaryDirectory(prefix="spade-race-") as work:
        server = SeaweedS3(binary, Path(work) / "seaweedfs").start()
        try:
            os.environ.update(server.env())
            env = {**os.environ, **server.env()}
            bucket = server.new_bucket()
            data = write_sample_dataset(f"s3://{bucket}/archive", SampleSpec(size=64, train=6, test_good=4,
                                                                             test_per_defect=4))
            config = Path(work) / "tiny.yaml"
            config.write_text(yaml.safe_dump(plumbing_config(**TINY).to_dict()))
            gallery = f"s3://{bucket}/gallery"
            fit = spade(["fit", "--config", str(config), "--images", f"{data}/train/good", "--gallery", gallery], env)
            _, err = fit.communicate()
            if fit.returncode:
                sys.exit(err[-2000:])
            inputs = len(server.filesystem().find(f"{data[5:]}/test"))
            one_busy = rows_ok = 0
            for attempt in range(args.tries):
                out = f"s3://{bucket}/night-{attempt}"
                started = time.monotonic()
                runs = [spade(["score", "--config", str(config), "--gallery", gallery, "--images", f"{data}/test",
                               "--out", out, "--date", "2026-11-30"], env) for _ in range(2)]
                codes = sorted(run.wait() for run in runs)
                rows = read_score_table(out).num_rows
                one_busy += codes == [0, 75]
                rows_ok += rows == inputs
                print(f"try {attempt + 1}: exit codes {codes}, {rows} rows for {inputs} inputs, "
                      f"{time.monotonic() - started:.1f}s", flush=True)
        finally:
            server.stop()
    print(f"RESULT tries={args.tries} one_busy={one_busy} rows_ok={rows_ok}")


if __name__ == "__main__":
    main()
