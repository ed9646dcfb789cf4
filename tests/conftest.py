import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spade.config import SpadeConfig
from spade.io.samples import SampleSpec, write_sample_dataset

BEAM_ARGS = ["--runner=FnApiRunner"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def plumbing_config(**changes) -> SpadeConfig:
    """resnet18 with random weights: fast, for tests of plumbing (not of accuracy); the paper's framing, image
    score, correspondence and frames (centre crop, kNN, highest calibration score as the threshold, every layer exact,
    brightness kept)."""
    base = dict(backbone="resnet18", weights="random", k=3, batch_size=4, calibration_images=4, num_threads=2,
                resize=256, crop=224, framing="crop", feature_aggregation=1, image_score="knn",
                calibration_image_fpr=0.0, eval_region="crop", approximate_layers=(), brightness="keep")
    base.update(changes)
    return SpadeConfig(**base)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> str:
    return write_sample_dataset(str(tmp_path_factory.mktemp("sample")), SampleSpec(train=8, test_good=3, test_per_defect=3))


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (it sits beside the project in CI only; licence CC BY-NC-SA 4.0)")
    return path


TINY = dict(resize=72, crop=64, batch_size=2, calibration_images=3, num_threads=1)  # real work per image, small


@pytest.fixture(scope="session")
def tiny_night(tmp_path_factory) -> dict:
    """For tests that run `spade` as a separate process: a gallery fitted in-process with small crops, the same
    config as a YAML file, and 30 test inputs."""
    from pipelines.fit import run_fit

    root = tmp_path_factory.mktemp("tiny-night")
    data = write_sample_dataset(str(root / "data"), SampleSpec(size=64, train=6, test_good=10, test_per_defect=10))
    config = plumbing_config(**TINY)
    gallery = str(root / "gallery")
    run_fit(config, f"{data}/train/good", gallery, BEAM_ARGS)
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    inputs = sorted(str(p) for p in Path(data, "test").rglob("*.png"))
    assert len(inputs) == 30
    return {"config": str(config_file), "gallery": gallery, "images": f"{data}/test", "inputs": inputs,
            "data": data}


def spade_process(args: list[str], tmpdir, wrapper: list[str] = (), quiet: bool = True) -> subprocess.Popen:
    """`spade ARGS` (local runner; quiet unless asked) in its own process with its own temporary directory."""
    command = [*wrapper, sys.executable, "-m", "pipelines.cli", *(["--quiet"] if quiet else []), *args,
               "--runner=FnApiRunner"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmpdir)}, cwd=Path(__file__).resolve().parents[1])
