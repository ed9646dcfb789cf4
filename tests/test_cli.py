"""The `spade` command line: argument routing, thresholds from `evaluate` used by `score`, clear errors."""
import json

import pytest

from pipelines.cli import build_parser, main
from spade.io.results import read_run_info, read_score_table


def test_beam_arguments_pass_through_untouched():
    args, beam_args = build_parser().parse_known_args(
        ["score", "--gallery", "g", "--images", "i", "--out", "o", "--runner=DaskRunner", "--direct_num_workers", "2", "--quiet"])
    assert beam_args == ["--runner=DaskRunner", "--direct_num_workers", "2"]
    assert args.quiet and args.runner_profile is None


def test_missing_gallery_is_a_clear_error(tmp_path, capsys):
    code = main(["score", "--weights", "random", "--config", "configs/fast.yaml", "--gallery", str(tmp_path / "none"),
                 "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--runner=FnApiRunner"])
    assert code == 2
    err = capsys.readouterr().err
    assert "spade score: error:" in err and "spade fit" in err and str(tmp_path / "none") in err


def test_evaluate_thresholds_drive_score(sample_root, tmp_path):
    common = ["--weights", "random", "--config", "configs/fast.yaml", "--k", "3", "--runner=FnApiRunner"]
    gallery, first, second, ev = (str(tmp_path / n) for n in ("gallery", "first", "second", "eval"))
    assert main(["--quiet", "fit", "--images", f"{sample_root}/train/good", "--gallery", gallery, *common]) == 0
    assert main(["score", "--gallery", gallery, "--images", sample_root, "--out", first, "--quiet", *common]) == 0
    assert main(["evaluate", "--scores", first, "--masks", f"{sample_root}/ground_truth", "--out", ev]) == 0
    chosen = json.loads((tmp_path / "eval" / "thresholds.json").read_text())
    assert main(["score", "--gallery", gallery, "--images", sample_root, "--out", second,
                 "--thresholds", f"{ev}/thresholds.json", *common]) == 0
    used = read_run_info(second)["thresholds"]
    assert used["image"] == pytest.approx(chosen["image"]) and used["pixel"] == pytest.approx(chosen["pixel"])
    assert "file" in used["source"]
    for row in read_score_table(second).to_pylist():
        assert row["is_anomalous"] == (row["image_score"] > chosen["image"])


@pytest.mark.parametrize("name", ["default", "fast", "paper", "paper-lite0", "resnet152-resmem", "approximate"])
def test_shipped_configs_load(name):
    from pathlib import Path

    from spade.config import load_config

    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"))
    assert config.layers == ("layer1", "layer2", "layer3") and config.kappa == 1
    assert config.scoring_mode == ("approximate" if name == "approximate" else "exact")
