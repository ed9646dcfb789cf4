import os
from pathlib import Path

import pytest

from spade.config import SpadeConfig
from spade.io.samples import SampleSpec, write_sample_dataset

BEAM_ARGS = ["--runner=FnApiRunner"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def plumbing_config(**changes) -> SpadeConfig:
    """resnet18 with random weights: fast, for tests of plumbing (not of accuracy)."""
    base = dict(backbone="resnet18", weights="random", k=3, batch_size=4, calibration_images=4, num_threads=2)
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
