"""The `spade` command line: fit, score, evaluate, report, trend, demo."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Sequence

from spade.config import load_config

EXAMPLES = {
    "fit": "spade fit --config configs/default.yaml --images 'data/bottle/train/good/*.png' --gallery runs/gallery",
    "score": "spade score --config configs/default.yaml --gallery runs/gallery --images 'data/bottle/test/**/*.png' --out runs/scores\n"
             "  spade score --config configs/default.yaml --gallery runs/gallery --images 'archive/**/*.png' --out runs/nightly --date 2026-11-28\n"
             "  spade score --gallery 'galleries/{line}-{camera}' --images 'archive/**/*.png' --out runs/nightly --date 2026-11-28",
    "evaluate": "spade evaluate --scores runs/scores --masks data/bottle/ground_truth --out runs/eval",
    "report": "spade report --scores runs/scores --masks data/bottle/ground_truth --out runs/report",
    "trend": "spade trend --scores runs/nightly --out runs/trend",
    "demo": "spade demo --out runs/demo",
    "verify-gallery": "spade verify-gallery --gallery runs/gallery",
}
EXIT_ERROR, EXIT_DAMAGED, EXIT_BUSY = 2, 3, 75  # 75: EX_TEMPFAIL, another run holds the lease; try again later
EXIT_ALERT = 4  # `spade trend`: a gallery's last night warns (drift or flagged share)
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
_RECEIVED: list[int] = []  # the signal that interrupted this run, if any


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (configs/default.yaml, configs/fast.yaml, ...); default: built-in defaults")
    parser.add_argument("--weights", help="override the config's weights: auto, imagenet, random, a package name, or a .pth path/URL")
    parser.add_argument("--k", type=int, help="override K, the number of nearest normal images")
    parser.add_argument("--batch-size", type=int, dest="batch_size", help="override the extraction/scoring batch size")


def _common_args(parser: argparse.ArgumentParser, default) -> None:
    """Options accepted before or after the subcommand (`spade --quiet score ...` = `spade score ... --quiet`)."""
    parser.add_argument("--log-level", default=default, help="log level of spade's own messages (default INFO)")
    parser.add_argument("--quiet", action="store_true", default=default, help="print only results and errors")
    parser.add_argument("--runner-profile", dest="runner_profile", default=default,
                        help="YAML with `beam_args:` (configs/runners/*.yaml); arguments given here win")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spade", allow_abbrev=False,
        description="SPADE anomaly detection (Cohen & Hoshen 2020) as Apache Beam batch pipelines. "
                    "Arguments not listed here (--runner, --direct_num_workers, ...) pass through to Beam.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()), formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_args(parser, argparse.SUPPRESS)
    parser.set_defaults(log_level="INFO", quiet=False, runner_profile=None)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, allow_abbrev=False, help=help_text, description=help_text, epilog=f"example:\n  {EXAMPLES[name]}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        _common_args(command, argparse.SUPPRESS)
        return command

    fit = add("fit", "Build a gallery from normal (defect-free) images.")
    _config_args(fit)
    fit.add_argument("--images", required=True, help="glob, folder (MVTec root: its train/), or tar shards; local or fsspec URL")
    fit.add_argument("--gallery", required=True,
                     help="gallery folder to write (local path or fsspec URL); or a routing rule, one gallery per "
                          "partition of --images: a template such as 'galleries/{line}-{camera}' (fields from "
                          "line=.../camera=... folders) or a routes table (routes.yaml)")
    fit.add_argument("--append", action="store_true",
                     help="add these images to an existing gallery without extracting its old images again")

    score = add("score", "Score images against a gallery: score table, score maps, masks.")
    _config_args(score)
    score.add_argument("--gallery", required=True,
                       help="gallery folder written by `spade fit`; or a routing rule that scores each partition of "
                            "--images against its own gallery in one run: a template such as "
                            "'galleries/{line}-{camera}' (fields from line=.../camera=... folders) or a routes table "
                            "(routes.yaml); outputs go to OUT/<partition>/, inputs no rule routes to OUT/unrouted/")
    score.add_argument("--images", required=True, help="glob, folder (MVTec root: its test/), or tar shards")
    score.add_argument("--out", required=True, help="output folder: scores/*.parquet, maps/*.png, masks/*.png, run.json")
    score.add_argument("--date", dest="day", metavar="YYYY-MM-DD",
                       help="nightly mode: write to OUT/gallery=<hash>/date=YYYY-MM-DD/ and score only images "
                            "not yet scored with this gallery (a re-run is a no-op)")
    score.add_argument("--since", metavar="YYYY-MM-DD",
                       help="only inputs dated this day or later (a date in the path, else modification time)")
    score.add_argument("--thresholds", help="thresholds.json from `spade evaluate` (image/pixel); wins over the config "
                                            "and the gallery's calibration")
    score.add_argument("--rescore-all", action="store_true", dest="rescore_all",
                       help="nightly mode: score every input again (needed when the gallery changed)")

    evaluate = add("evaluate", "Image ROCAUC, pixel ROCAUC and PRO of a score run, per defect type.")
    evaluate.add_argument("--scores", required=True, help="the --out folder of `spade score`")
    evaluate.add_argument("--masks", help="MVTec ground_truth folder (<defect>/<stem>_mask.png); without it, image metrics only")
    evaluate.add_argument("--out", required=True, help="folder for metrics.json, metrics.csv and thresholds.json")
    evaluate.add_argument("--threshold-method", dest="threshold_method", default="auto",
                          choices=["auto", "max_f1", "target_fpr"],
                          help="auto: max F1 where defects are labelled, else the target false-positive rate")
    evaluate.add_argument("--image-fpr", dest="image_fpr", type=float, default=0.05,
                          help="target false-positive rate of the image threshold on good images (default 0.05)")
    evaluate.add_argument("--image-miss-rate", dest="image_miss_rate", type=float,
                          help="choose the image threshold that misses at most this share of the defective images "
                               "(e.g. 0.1; the fewest good images flagged at that rate); wins over --threshold-method")
    evaluate.add_argument("--pixel-fpr", dest="pixel_fpr", type=float,
                          help="target false-positive rate of the pixel threshold (default: the run's calibration_fpr)")

    report = add("report", "A static HTML report of a score run (opens from disk): metrics, ROC/PRO curves, "
                           "score histogram, top-N gallery with heatmaps, errors.")
    report.add_argument("--scores", required=True, help="the --out folder of `spade score`")
    report.add_argument("--masks", help="MVTec ground_truth folder; without it, no pixel metrics or ground-truth pictures")
    report.add_argument("--out", required=True, help="report folder to write: index.html and img/*.png")
    report.add_argument("--top", type=int, default=24, help="how many of the most anomalous images to show (default 24)")

    trend = add("trend", "Trends across nights: per gallery and night, images, errors, flagged share, score quantiles "
                         "and drift tests, as trend.parquet, trend.json and a static page; exits 4 when a gallery's "
                         "last night warns.")
    trend.add_argument("--scores", required=True, help="the --out of `spade score --date` (routed or not)")
    trend.add_argument("--out", required=True, help="folder for trend.parquet, trend.json and index.html")
    trend.add_argument("--window", type=int, default=7, help="previous nights a night is compared with (default 7)")
    trend.add_argument("--alpha", type=float, default=0.001,
                       help="p-value below which a Kolmogorov-Smirnov drift test warns (default 0.001)")
    trend.add_argument("--flagged-alert", dest="flagged_alert", type=float, default=0.10,
                       help="warn when a night flags more than this share of its images (default 0.10)")
    trend.add_argument("--baseline", type=int, default=3,
                       help="a gallery's first nights, its commissioning, that the last as many are compared with for a "
                            "slow drift (default 3)")
    trend.add_argument("--min-images", dest="min_images", type=int, default=5,
                       help="good-looking images a night needs for the drift tests (default 5)")

    verify = add("verify-gallery", "Check every file of a gallery against the sizes and sha256 its manifest records.")
    verify.add_argument("--gallery", required=True, help="gallery folder written by `spade fit`")

    demo = add("demo", "Fit, score and evaluate on an embedded synthetic sample, printing where outputs are.")
    _config_args(demo)
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    return parser


class _QuietBeam(logging.Filter):
    """Beam's own messages below ERROR are noise to a user of this tool (unless --log-level DEBUG); after an
    interrupt, every message is (the tracebacks of the stages it cut short)."""

    def __init__(self, debug: bool = False):
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if _RECEIVED:  # interrupted: the one line `_exit_interrupted` prints says it all
            return False
        return self.debug or record.levelno >= logging.ERROR or "apache_beam" not in record.pathname


def _setup_logging(level: str, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_QuietBeam(debug=level.upper() == "DEBUG"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
    ours = logging.WARNING if quiet else getattr(logging, level.upper(), logging.INFO)
    for name in ("spade", "transforms", "pipelines"):
        logging.getLogger(name).setLevel(ours)


def _interrupt(signum: int, frame) -> None:
    """Unwind the run like Ctrl-C, so that every `finally` cleans up; remember the signal (Beam re-raises what a
    DoFn raised as another exception type)."""
    for other in SIGNAL_EXIT:  # a second signal while cleaning up must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    _RECEIVED.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _exit_interrupted(command: str, signum: int) -> None:
    """One line, then exit at once with 128 + the signal number: worker threads still finishing a bundle are
    not waited for (what they commit is atomic; the next run cleans up or reuses it)."""
    print(f"spade {command}: interrupted by {signal.Signals(signum).name}; staging and temporary files removed, "
          "nothing half-published. Work already committed is kept: run the same command again to resume.",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(SIGNAL_EXIT[signum])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    _setup_logging(args.log_level, args.quiet)
    if args.runner_profile:
        from pipelines.options import load_runner_profile

        beam_args = load_runner_profile(args.runner_profile) + beam_args
    say = logging.getLogger("spade").info
    previous = {signum: signal.signal(signum, _interrupt) for signum in SIGNAL_EXIT}
    try:
        return _run(args, beam_args, say)
    except BaseException:
        if _RECEIVED:
            _exit_interrupted(args.command, _RECEIVED[0])
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace, beam_args: list[str], say) -> int:
    from spade.index.gallery import GalleryDamaged
    from spade.io.lease import LeaseHeld

    try:
        if args.command == "verify-gallery":
            from spade.index.gallery import verify_gallery

            problems = verify_gallery(args.gallery)
            for problem in problems:
                print(f"spade verify-gallery: {args.gallery}: {problem}", file=sys.stderr)
            if problems:
                print(f"spade verify-gallery: {args.gallery} is damaged or incomplete ({len(problems)} problem(s)): "
                      f"re-run `spade fit --gallery {args.gallery}` to rebuild it", file=sys.stderr)
                return EXIT_DAMAGED
            print(f"spade verify-gallery: {args.gallery}: every file matches its manifest (size and sha256)")
            return 0
        if args.command == "evaluate":
            from pipelines.evaluate import run_evaluate

            run_evaluate(args.scores, args.masks, args.out, say, threshold_method=args.threshold_method,
                         image_miss_rate=args.image_miss_rate,
                         image_fpr=args.image_fpr, pixel_fpr=args.pixel_fpr)
            return 0
        if args.command == "trend":
            from pipelines.trend import run_trend
            from spade.evaluation.trend import DriftRule

            rule = DriftRule(window=args.window, alpha=args.alpha, flagged_alert=args.flagged_alert,
                             min_images=args.min_images, baseline=args.baseline)
            verdict = run_trend(args.scores, args.out, say, rule)
            return EXIT_ALERT if verdict["status"] == "alert" else 0
        if args.command == "report":
            from pipelines.report import run_report

            run_report(args.scores, args.masks, args.out, args.top, say)
            return 0
        overrides = {key: value for key, value in (("weights", args.weights), ("k", args.k), ("batch_size", args.batch_size))
                     if value is not None}  # an option not given must not undo the demo's K
        if args.command == "demo":
            from pipelines.demo import DEMO_OVERRIDES, run_demo

            config = load_config(args.config, {**(DEMO_OVERRIDES if not args.config else {}), **overrides})
            run_demo(args.out, config, beam_args, say)
        elif args.command == "fit":
            from pipelines.fit import run_fit

            run_fit(load_config(args.config, overrides), args.images, args.gallery, beam_args, say, append=args.append)
        elif args.command == "score":
            from pipelines.score import Nightly, run_score

            run_score(load_config(args.config, overrides), args.gallery, args.images, args.out, beam_args, say,
                      Nightly(day=args.day, since=args.since, rescore_all=args.rescore_all), args.thresholds)
    except LeaseHeld as exc:
        print(f"spade {args.command}: busy: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except GalleryDamaged as exc:
        print(f"spade {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_DAMAGED
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        if _RECEIVED:  # an interrupt that Beam re-raised as another exception
            raise
        print(f"spade {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
