"""Accuracy benchmark: `spade fit`, `score` and `evaluate` (in this process, FnApiRunner) for a list of
MVTec-layout folders and configs; one table.

    python benchmarks/accuracy.py                                   # every set in ../shared/data, configs/default.yaml
    python benchmarks/accuracy.py --data /data/mvtec/bottle --data /data/mpdd/metal_plate \\
        --config configs/default.yaml --config configs/default.yaml:image_score=knn --config configs/paper-crop.yaml
    python benchmarks/accuracy.py --smoke                           # a tiny synthetic set (~1 min)

A config is a YAML file, optionally followed by ``:key=value,key=value`` overrides (values as YAML).
Configs that differ only in ``image_score`` or ``eval_region`` share one gallery (fit once; its
calibration holds every mode's threshold; the bank modes, bank_max and combined_bank, get a gallery of their own,
fitted with its patch bank); the fit column then repeats that fit's time.

Columns: image ROCAUC; pixel ROCAUC and PRO on the paper's centre-crop region (short side 256, centre 224:
the region the paper's preprocessing inspects, whatever the config's framing) and on the full image;
at the default thresholds (those the gallery calibrated at fit, for the config's image score) the
good images flagged and the defective images missed; fit seconds (features + calibration); scoring
images per second (whole `spade score` run). The machine may be shared: compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spade.config import SpadeConfig, load_config, stable_hash  # noqa: E402
from spade.evaluation.ground_truth import GOOD, evaluate, labelled_rows  # noqa: E402
from spade.io.results import read_score_table  # noqa: E402
from spade.io.samples import SampleSpec, write_sample_dataset  # noqa: E402
from spade.scoring.image_score import SELECTED_MODES  # noqa: E402
from pipelines.fit import run_fit  # noqa: E402
from pipelines.score import run_score  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BEAM_ARGS = ["--runner=FnApiRunner"]
SCORE_ONLY_KEYS = ("image_score", "eval_region")
PAPER_RESIZE, PAPER_CROP = 256, 224  # the "crop" columns: the paper's centre-crop region, whatever the config's framing


def parse_spec(spec: str) -> tuple[str, SpadeConfig]:
    """'path.yaml[:k=v,k=v]' -> (label, config)."""
    path, _, overrides = spec.partition(":")
    values = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        values[key.strip()] = yaml.safe_load(value)
    label = Path(path).stem + (f" {overrides}" if overrides else "")
    return label, load_config(path, values)


def gallery_key(config: SpadeConfig) -> str:
    """Configs with the same key can share a gallery: everything but the score-time-only settings."""
    shared = {k: v for k, v in config.to_dict().items() if k not in SCORE_ONLY_KEYS}
    return stable_hash(shared | {"bank": config.uses_patch_bank, "selected": config.image_score in SELECTED_MODES})


def confusion(table) -> dict[str, int]:
    """Good images flagged and defective images missed by the run's `is_anomalous` (default thresholds)."""
    rows = labelled_rows(table)
    good = [r for r in rows if r["label"] == GOOD]
    bad = [r for r in rows if r["label"] != GOOD]
    return {"good": len(good), "good_flagged": sum(bool(r["is_anomalous"]) for r in good),
            "defective": len(bad), "defective_missed": sum(not r["is_anomalous"] for r in bad)}


def run_one(data: Path, label: str, config: SpadeConfig, work: Path, galleries: dict, say) -> dict:
    key = (str(data), gallery_key(config))
    if key not in galleries:
        gallery = work / f"gallery-{data.name}-{key[1]}"
        started = time.perf_counter()
        run_fit(config, str(data), str(gallery), BEAM_ARGS, say=say)
        galleries[key] = (str(gallery), time.perf_counter() - started)
    gallery, fit_s = galleries[key]
    out = work / f"scores-{data.name}-{stable_hash(config.to_dict())}"
    started = time.perf_counter()
    summary = run_score(config, gallery, str(data), str(out), BEAM_ARGS, say=say)
    score_s = time.perf_counter() - started
    table = read_score_table(str(out))
    row = {"set": data.name, "config": label, "fit_s": fit_s, "images_per_s": summary["ok"] / score_s,
           **confusion(table)}
    masks = str(data / "ground_truth") if (data / "ground_truth").is_dir() else None
    for region in ("crop", "full"):
        result = evaluate(table, masks, PAPER_RESIZE, PAPER_CROP, region)
        row["image_rocauc"] = result["overall"]["image_rocauc"]
        row[f"pixel_{region}"] = result["overall"].get("pixel_rocauc", float("nan"))
        row[f"pro_{region}"] = result["overall"].get("pro", float("nan"))
    return row


def format_rows(rows: list[dict]) -> str:
    """A Markdown table (pastes into the README)."""
    head = ("| set | config | image ROCAUC | pixel ROCAUC crop / full | PRO crop / full | good flagged | defective missed "
            "| fit s | score images/s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['set']} | {r['config']} | {r['image_rocauc']:.3f} | {r['pixel_crop']:.3f} / {r['pixel_full']:.3f} "
                     f"| {r['pro_crop']:.3f} / {r['pro_full']:.3f} | {r['good_flagged']}/{r['good']} "
                     f"| {r['defective_missed']}/{r['defective']} | {r['fit_s']:.1f} | {r['images_per_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", default=[], help="an MVTec-layout folder (train/good, test/*, "
                        "ground_truth/*); repeat for several (default: every set in ../shared/data)")
    parser.add_argument("--config", action="append", default=[],
                        help="a config YAML, optionally with :key=value,... overrides; repeat (default: configs/default.yaml)")
    parser.add_argument("--work", help="folder for galleries and score runs (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="a tiny synthetic set with the default config and its "
                        "knn variant: checks the benchmark runs (~1 min), numbers mean nothing")
    parser.add_argument("--verbose", action="store_true", help="show the pipelines' progress lines")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="spade-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    specs = args.config or [str(ROOT / "configs" / "default.yaml")]
    if args.smoke:
        data = [Path(write_sample_dataset(str(work / "sample"), SampleSpec(size=96, train=6, test_good=3, test_per_defect=2)))]
        specs = args.config or [str(ROOT / "configs" / "default.yaml") + ":batch_size=4",
                                str(ROOT / "configs" / "default.yaml") + ":batch_size=4,image_score=knn"]
    elif args.data:
        data = [Path(d) for d in args.data]
    else:
        data = sorted(p for p in SHARED.iterdir() if (p / "train").is_dir()) if SHARED.is_dir() else []
    if not data:
        parser.error(f"no data: pass --data FOLDER (MVTec layout), or put sets in {SHARED}, or use --smoke")
    say = print if args.verbose else (lambda _msg: None)
    rows, galleries = [], {}
    try:
        for folder in data:
            for spec in specs:
                label, config = parse_spec(spec)
                print(f"accuracy: {folder.name} / {label} ...", flush=True)
                rows.append(run_one(folder, label, config, work, galleries, say))
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if not args.work:  # galleries and score runs, gigabytes a set: kept only in a folder the user named
            shutil.rmtree(work, ignore_errors=True)
    print(format_rows(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
