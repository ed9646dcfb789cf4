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
    strict = str(tmp_path / "strict")
    assert main(["evaluate", "--scores", first, "--masks", f"{sample_root}/ground_truth", "--out", strict,
                 "--image-miss-rate", "0"]) == 0
    picked = json.loads((tmp_path / "strict" / "thresholds.json").read_text())
    assert picked["image_selection"]["method"] == "target_miss"
    defective = [r["image_score"] for r in read_score_table(first).to_pylist() if r["label"] != "good"]
    assert min(defective) > picked["image"]  # no defective image missed at the chosen point


@pytest.mark.parametrize("name", ["default", "exact", "fast", "paper", "paper-lite0", "resnet152-resmem", "approximate"])
def test_shipped_configs_load(name):
    from pathlib import Path

    from spade.config import load_config

    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"))
    assert config.layers == ("layer1", "layer2", "layer3") and config.kappa == 1
    assert config.scoring_mode == ("approximate" if name == "approximate" else "exact")
    # the coreset bank searches layer 1 in the default, every layer in approximate, none in the paper's and exact
    assert config.coreset_layers == {"default": ("layer1",), "approximate": config.layers}.get(name, ())


def test_the_built_in_defaults_are_the_recommended_config_and_the_paper_is_one_flag_away():
    from pathlib import Path

    from spade.config import SpadeConfig, load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(None) == load_config(str(configs / "default.yaml")) == SpadeConfig()
    assert SpadeConfig().backbone == "tf_efficientnet_lite2" and SpadeConfig().framing == "tiles"
    paper = load_config(str(configs / "paper.yaml"))
    assert (paper.backbone, paper.framing, paper.crop, paper.k, paper.image_score, paper.feature_aggregation) == \
        ("wide_resnet50_2", "crop", 224, 50, "knn", 1)


def test_the_small_defects_config_is_the_default_at_a_finer_scale():
    """configs/small-defects.yaml copies the default: only its pixel scale, tile size and image score differ, so a
    change of the default reaches it (or this test says where it did not)."""
    import dataclasses
    from pathlib import Path

    from spade.config import SpadeConfig, load_config

    small = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "small-defects.yaml"))
    differ = {f.name: getattr(small, f.name) for f in dataclasses.fields(SpadeConfig)
              if getattr(small, f.name) != getattr(SpadeConfig(), f.name)}
    assert differ == {"resize": 384, "tile_size": 384, "image_score": "combined_selected"}


def test_demo_runs_the_default_end_to_end_and_says_where_its_outputs_are(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quiet", "demo", "--out", str(out), "--runner=FnApiRunner"]) == 0
    printed = capsys.readouterr().out
    assert "Demo outputs:" in printed
    info = read_run_info(str(out / "scores"))
    from spade.config import SpadeConfig

    default = SpadeConfig()
    assert info["config"]["framing"] == default.framing and info["config"]["image_score"] == default.image_score
    assert info["config"]["backbone"] == default.backbone and info["config"]["k"] == 3  # what 12 images support
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["overall"]["image_rocauc"] > 0.9  # real ImageNet features find the sample's scratches and spots
    assert metrics["operating_points"] and any(p["reaches"] == "run threshold" for p in metrics["operating_points"])
    for name in ("gallery", "scores", "maps", "masks", "metrics"):
        assert f"  {name}" in printed
