"""Building a static HTML report of a score run: thumbnails, heatmap overlays, figures and the page.

Pure functions (arrays and dicts in, PNG bytes and HTML text out); reading a run and
writing the files is `pipelines.report`. Figures use matplotlib's object API (no pyplot
state, no display), so this works headless and in threads.
"""
from __future__ import annotations

import html
import io
import math
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

THUMB = 256
CURVE_POINTS = 1000

# ---------------------------------------------------------------------------------------------
# Images


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) array → PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def thumb_size(width: int, height: int, size: int = THUMB) -> tuple[int, int]:
    """(w, h) with the long side ``size``, keeping the aspect ratio."""
    scale = size / max(width, height, 1)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(rgb, dtype=np.uint8)).resize(size, Image.BILINEAR), dtype=np.uint8)


def resize_scores(score_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float score map resampled (area-averaged when shrinking) to (w, h)."""
    img = Image.fromarray(np.asarray(score_map, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size, Image.BOX if size[0] < img.width else Image.BILINEAR), dtype=np.float32)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool mask → uint8 (0/255) thumbnail; a pixel is on if any of its area is (so thin defects stay visible)."""
    img = Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8))
    return (np.asarray(img.resize(size, Image.BOX)) > 0).astype(np.uint8) * 255


def global_scale(pixel_max: Iterable[float]) -> tuple[float, float]:
    """(low, high) used to colour every heatmap alike: high is the largest score of any pixel in the
    run, low the smallest per-image maximum (the least anomalous image's hottest pixel), so the
    background of normal images stays blue and images are comparable with each other."""
    values = np.asarray([v for v in pixel_max if v is not None and np.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return 0.0, 1.0
    high, low = float(values.max()), float(values.min()) if values.size > 1 else 0.0
    if not high > low:
        low = 0.0
    if not high > low:
        high = low + 1.0
    return low, high


def colorize(score_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scores → jet RGB uint8, ``low`` and below dark blue, ``high`` and above dark red."""
    from matplotlib import colormaps

    norm = np.clip((np.asarray(score_map, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return (colormaps["jet"](norm)[..., :3] * 255.0).round().astype(np.uint8)


def heat_overlay(rgb: np.ndarray | None, score_map: np.ndarray, low: float, high: float, alpha: float = 0.5) -> np.ndarray:
    """Jet-coloured scores blended over the image (same size); the bare heatmap when ``rgb`` is None."""
    heat = colorize(score_map, low, high).astype(np.float32)
    if rgb is None:
        return heat.astype(np.uint8)
    return (alpha * heat + (1.0 - alpha) * np.asarray(rgb, dtype=np.float32)).round().clip(0, 255).astype(np.uint8)


def outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """``rgb`` with the border pixels of ``mask`` painted ``colour``."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    out = np.array(rgb, dtype=np.uint8, copy=True)
    out[mask & ~inner] = colour
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(width: float = 4.2, height: float = 3.7):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def resample_curve(x: np.ndarray, y: np.ndarray, x_max: float = 1.0, points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """A monotone curve (ROC, PRO) on an even grid of ``points`` x values in [0, x_max], for plotting."""
    grid = np.linspace(0.0, x_max, points)
    return grid, np.interp(grid, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))


def _label(name: str, value: float | None, what: str) -> str:
    return f"{name} ({what} {value:.3f})" if value is not None and np.isfinite(value) else name


def curve_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float | None]], title: str, xlabel: str, ylabel: str,
                 what: str, x_max: float = 1.0, diagonal: bool = True) -> bytes:
    """Curves {name: (x, y, area)} on one axes; the one named 'overall' drawn thick and black."""
    fig, ax = _figure()
    for name, (x, y, area) in curves.items():
        gx, gy = resample_curve(x, y, x_max)
        style = dict(color="black", linewidth=2.2, zorder=3) if name == "overall" else dict(linewidth=1.2)
        ax.plot(gx, gy, label=_label(name, area, what), **style)
    if diagonal:
        ax.plot([0, x_max], [0, x_max], color="grey", linewidth=0.8, linestyle=":")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, x_max), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return _save(fig)


def histogram_figure(groups: Mapping[str, Sequence[float]], thresholds: Mapping[str, float | None], title: str) -> bytes:
    """Overlaid histograms of image scores per group (e.g. good / defective), shared bins, threshold lines."""
    fig, ax = _figure(6.0, 3.6)
    everything = np.concatenate([np.asarray(v, dtype=np.float64) for v in groups.values()]) if groups else np.zeros(0)
    everything = everything[np.isfinite(everything)]
    if everything.size:
        count = min(40, max(10, int(np.sqrt(everything.size)) * 2))
        skewed = everything.min() > 0 and everything.max() / everything.min() > 4
        if skewed:  # long tail (a few very anomalous images): log bins keep the bulk readable
            from matplotlib.ticker import FormatStrFormatter

            bins = np.geomspace(everything.min(), everything.max(), count + 1)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        else:
            bins = np.histogram_bin_edges(everything, bins=count)
        colours = {"good": "tab:green", "defective": "tab:red"}
        for name, values in groups.items():
            values = np.asarray(values, dtype=np.float64)
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} ({values.size})", color=colours.get(name))
        low, high = bins[0], bins[-1]
        if skewed:
            low, high = low / 1.05, high * 1.05
        else:
            margin = (high - low) * 0.05 or 1.0
            low, high = low - margin, high + margin
        ax.set_xlim(low, high)
        styles = ["--", ":", "-."]
        for i, (name, value) in enumerate((n, v) for n, v in thresholds.items() if v is not None):
            label = f"{name} {value:.4g}"
            if low <= value <= high:
                ax.axvline(value, color="black", linestyle=styles[i % len(styles)], linewidth=1.3, label=label)
            else:  # far outside the scores: say so at the edge instead of squashing the histogram
                left = value < low
                ax.annotate(("← " if left else "") + label + (" →" if not left else ""), xy=(0.01 if left else 0.99, 0.97 - 0.07 * i),
                            xycoords="axes fraction", ha="left" if left else "right", va="top", fontsize=8,
                            bbox=dict(boxstyle="round", fc="#fff3cd", ec="#e0b400"))
        ax.legend(fontsize=8, loc="best")
        ax.set(title=title, xlabel="image score" + (" (log scale)" if skewed else ""), ylabel="images")
    else:
        ax.text(0.5, 0.5, "no scored images", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="image score", ylabel="images")
    ax.grid(alpha=0.3)
    return _save(fig)


def colorbar_figure(low: float, high: float) -> bytes:
    """The heatmap colour scale as a small horizontal bar."""
    from matplotlib import colormaps
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 0.75), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ColorbarBase(ax, cmap=colormaps["jet"], norm=Normalize(low, high), orientation="horizontal")
    ax.set_xlabel("pixel score (heatmap colour scale, same for every image)", fontsize=8)
    ax.tick_params(labelsize=8)
    return _save(fig)


# ---------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:14px} th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta td:first-child{font-weight:600;background:#fafafa}
.warn{background:#fff3cd;border:1px solid #e0b400;padding:8px 12px;margin:12px 0}
.bad{background:#fde2e2;border:1px solid #d33;padding:8px 12px;margin:12px 0}
.note{color:#555;font-size:13px}
.figs{display:flex;flex-wrap:wrap;gap:16px} .figs img{border:1px solid #ddd;max-width:100%}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;margin:10px 0;background:#fcfcfc}
.card h3{margin:0 0 6px 0;font-size:15px} .card h3 a{text-decoration:none}
.strip{display:flex;gap:8px;flex-wrap:wrap} figure{margin:0;text-align:center;max-width:258px}
figure img{display:block;border:1px solid #999;max-width:256px;max-height:256px}
figcaption{font-size:12px;color:#444;margin-top:2px}
.missing{width:200px;height:120px;display:flex;align-items:center;justify-content:center;border:1px dashed #999;
 color:#666;font-size:12px;padding:6px;box-sizing:border-box;text-align:center}
tr.flag td{background:#fff0f0} tr:target td{background:#ffffb0}
.label-good{color:#18722b;font-weight:600} .label-defect{color:#b00020;font-weight:600}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: NaN/None as 'n/a', floats to ``digits`` decimals (or 4 significant for big ones)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[str]], css: str = "", numeric: Sequence[int] = ()) -> str:
    out = [f'<table class="{css}">']
    if headers:
        out.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(src: str | None, alt: str, caption: str, missing: str = "not available") -> str:
    body = f'<img src="{esc(src)}" alt="{esc(alt)}">' if src else f'<div class="missing">{esc(missing)}</div>'
    return f"<figure>{body}<figcaption>{caption}</figcaption></figure>"


def _label_html(label: str) -> str:
    if not label:
        return '<span class="note">unlabelled</span>'
    return f'<span class="label-{"good" if label == "good" else "defect"}">{esc(label)}</span>'


def metrics_section(metrics_rows: Sequence[Mapping[str, Any]], has_masks: bool) -> str:
    rows = [[esc(r["defect"]) if r["defect"] != "overall" else "<b>overall</b>", fmt(r.get("images")),
             fmt(r.get("image_rocauc")), fmt(r.get("pixel_rocauc")), fmt(r.get("pro"))] for r in metrics_rows]
    note = "" if has_masks else '<p class="note">No ground-truth masks given (--masks): pixel ROCAUC and PRO are n/a.</p>'
    return (_table(["defect type", "defective images", "image ROCAUC", "pixel ROCAUC", "PRO (FPR ≤ 0.3)"], rows,
                   "metrics", numeric=(1, 2, 3, 4)) + note
            + '<p class="note">Each defect type is scored against all good images; "overall" pools every defect type.</p>')


def thresholds_section(run_thresholds: Mapping[str, Any], selected: Mapping[str, Any] | None) -> str:
    rows = []
    if run_thresholds.get("image") is not None or run_thresholds.get("pixel") is not None:
        source = run_thresholds.get("source", "config")
        rows.append(["used by this run (is_anomalous, predicted masks)", fmt(run_thresholds.get("image"), 6),
                     fmt(run_thresholds.get("pixel"), 6), esc(source)])
    else:
        rows.append(["used by this run", "none", "none", "no threshold: is_anomalous empty, no predicted masks"])
    if selected is not None:
        for kind in ("image", "pixel"):
            sel = selected[f"{kind}_selection"]
            if sel.get("threshold") is None:
                how = esc(sel.get("reason", ""))
            elif sel["method"] == "max_f1":
                how = f"max F1 {sel['f1']:.3f} (precision {sel['precision']:.3f}, recall {sel['recall']:.3f})"
            else:
                how = f"target FPR {sel['target_fpr']:.4g} on good {kind}s (achieved {sel['fpr']:.4g})"
            rows.append([f"selected on this run's ground truth ({kind})",
                         fmt(sel.get("threshold"), 6) if kind == "image" else "",
                         fmt(sel.get("threshold"), 6) if kind == "pixel" else "", how])
    return (_table(["", "image threshold", "pixel threshold", "how"], rows, numeric=(1, 2))
            + '<p class="note">An image or pixel is anomalous when its score ≥ the threshold. Thresholds chosen on '
              "the same labelled images they are reported on are optimistic; `spade evaluate` writes them to "
              "thresholds.json for `spade score --thresholds`.</p>")


def operating_points_section(points: Sequence[Mapping[str, Any]]) -> str:
    """Good images flagged against defective images missed at several image thresholds (`spade.evaluation.
    thresholds.operating_points`): the table a line picks its operating point from."""
    rows = [[esc(p["reaches"]), fmt(p["threshold"], 6), f"{p['good_flagged']}/{p['good']} ({p['good_flagged_rate']:.1%})",
             f"{p['defective_missed']}/{p['defective']} ({p['defective_missed_rate']:.1%})"] for p in points]
    return (_table(["threshold reaching", "image threshold", "good flagged", "defective missed"], rows, numeric=(1,))
            + '<p class="note">Pick a row and apply its threshold with <code>spade score --thresholds</code> '
              '(a thresholds.json of <code>{"image": value}</code>), or let <code>spade evaluate --image-fpr</code> / '
              "<code>--image-miss-rate</code> write it. Chosen on these labelled images: optimistic for new ones.</p>")


def gallery_card(item: Mapping[str, Any]) -> str:
    """One top-N entry: item has rank, row (score row), anchor, and image paths/notes for orig/overlay/pred/gt."""
    row = item["row"]
    flag = row.get("is_anomalous")
    verdict = "" if flag is None else (" · <b>anomalous</b>" if flag else " · normal")
    head = (f'<h3 id="top-{item["rank"]}"><a href="#{esc(item["anchor"])}">#{item["rank"]}</a> · score '
            f'{fmt(row["image_score"])} · {_label_html(row["label"])}{verdict} · '
            f'<span class="note">{esc(item["name"])}</span></h3>')
    strip = "".join([
        _img(item.get("orig"), "original", "original", item.get("orig_note") or "original not available"),
        _img(item.get("overlay"), "heatmap overlay",
             "heatmap overlay" + (" + ground truth (green)" if item.get("gt") else ""), item.get("overlay_note") or "no score map"),
        _img(item.get("pred"), "predicted mask", esc(item.get("pred_caption", "predicted mask")), item.get("pred_note") or "no predicted mask"),
        _img(item.get("gt"), "ground truth", "ground-truth mask", item.get("gt_note") or "no ground truth"),
    ])
    return f'<div class="card">{head}<div class="strip">{strip}</div></div>'


def rows_table(rows: Sequence[Mapping[str, Any]], anchors: Mapping[int, str], top_ranks: Mapping[int, int]) -> str:
    """Every scored image, most anomalous first; ``anchors``/``top_ranks`` keyed by position in ``rows``."""
    body = []
    for i, row in enumerate(rows):
        rank = top_ranks.get(i)
        link = f'<a href="#top-{rank}">#{rank}</a>' if rank else ""
        cls = ' class="flag"' if row.get("is_anomalous") else ""
        map_link = f'<a href="{esc(_file_href(row.get("map_uri")))}">map</a>' if row.get("map_uri") else ""
        body.append(f'<tr id="{esc(anchors[i])}"{cls}><td class="num">{i + 1}</td><td>{link}</td>'
                    f'<td><a href="{esc(_file_href(row["uri"]))}">{esc(row["uri"])}</a></td><td>{_label_html(row["label"])}</td>'
                    f'<td class="num">{fmt(row["image_score"])}</td><td class="num">{fmt(row.get("pixel_max"))}</td>'
                    f'<td>{fmt(row.get("is_anomalous")) if row.get("is_anomalous") is not None else ""}</td>'
                    f'<td>{map_link}</td></tr>')
    return ('<table class="rows"><thead><tr><th>rank</th><th>top-N</th><th>image</th><th>label</th><th>image score</th>'
            '<th>pixel max</th><th>anomalous</th><th>score map</th></tr></thead><tbody>' + "".join(body) + "</tbody></table>")


def _file_href(uri: str | None) -> str:
    """A link target for a local path or URL (tar members link to their shard)."""
    if not uri:
        return ""
    uri = uri.split("#", 1)[0]
    if "://" in uri:
        return uri
    return "file://" + uri if uri.startswith("/") else uri


def errors_table(rows: Sequence[Mapping[str, Any]]) -> str:
    return _table(["image", "label", "error"], ([esc(r["uri"]), esc(r.get("label") or ""), esc(r.get("error") or "")] for r in rows))


def render_page(ctx: Mapping[str, Any]) -> str:
    """The whole report page. ``ctx`` keys: title, run (dict of facts), warnings, counts, has_labels, has_masks,
    metrics_rows, thresholds, selected, figures {name: (src, alt)}, colorbar, cards, rows, anchors, top_ranks,
    errors, problems, top_n, generated."""
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(ctx["title"])}</title>'
             f"<style>{CSS}</style></head><body>",
             f'<h1>{esc(ctx["title"])}</h1><p class="note">Generated {esc(ctx.get("generated") or datetime.now(timezone.utc).isoformat(timespec="seconds"))}'
             " by <code>spade report</code>. Static page: opens from disk, images are files beside it.</p>"]
    for warning in ctx.get("warnings", []):
        parts.append(f'<div class="warn">{esc(warning)}</div>')
    counts = ctx["counts"]
    parts.append('<h2 id="run">Run</h2>')
    parts.append(_table(None, ([esc(k), esc(v)] for k, v in ctx["run"].items()), "meta"))
    parts.append("<p>" + " · ".join(f"<b>{esc(v)}</b> {esc(k)}" for k, v in counts.items()) + "</p>")
    figs = ctx.get("figures", {})

    def fig(name: str) -> str:
        src, alt = figs[name]
        return f'<img src="{esc(src)}" alt="{esc(alt)}">'

    if ctx["has_labels"]:
        parts.append('<h2 id="metrics">Metrics</h2>')
        parts.append(metrics_section(ctx["metrics_rows"], ctx["has_masks"]))
        curves = [n for n in ("roc_image", "roc_pixel", "pro") if n in figs]
        parts.append('<h2 id="curves">ROC and PRO curves</h2><div class="figs">' + "".join(fig(n) for n in curves) + "</div>")
        if ctx.get("curve_note"):
            parts.append(f'<p class="note">{esc(ctx["curve_note"])}</p>')
        parts.append('<h2 id="distribution">Image scores: good vs defective</h2>')
    else:
        parts.append('<div class="note">No ground truth: images carry no MVTec labels (good / defect type), so '
                     "there are no metrics; below are the score distribution and the most anomalous images.</div>")
        parts.append('<h2 id="distribution">Image score distribution</h2>')
    parts.append(f'<div class="figs">{fig("histogram")}</div>')
    parts.append('<h2 id="thresholds">Thresholds</h2>' + thresholds_section(ctx["thresholds"], ctx.get("selected")))
    if ctx.get("operating_points"):
        parts.append('<h2 id="operating-points">Operating points</h2>' + operating_points_section(ctx["operating_points"]))
    if ctx.get("problems"):
        parts.append('<h2 id="problems">Problems</h2><ul>' + "".join(f"<li>{esc(p)}</li>" for p in ctx["problems"]) + "</ul>")
    parts.append(f'<h2 id="top">Top {len(ctx["cards"])} most anomalous images</h2>')
    if ctx.get("colorbar"):
        parts.append(f'<div class="figs"><img src="{esc(ctx["colorbar"])}" alt="heatmap colour scale"></div>')
    parts.append('<p class="note">Original · jet heatmap of the pixel scores over the image (one colour scale for '
                 "all images, above), with the ground-truth outline in green · predicted mask · ground-truth mask. "
                 "The #number links to the image's row in the table of all images.</p>")
    parts.extend(gallery_card(card) for card in ctx["cards"])
    if ctx["errors"]:
        parts.append(f'<h2 id="errors">Errors ({len(ctx["errors"])} images not scored)</h2>')
        parts.append(errors_table(ctx["errors"]))
    parts.append(f'<h2 id="rows">All scored images ({len(ctx["rows"])}), most anomalous first</h2>')
    parts.append(rows_table(ctx["rows"], ctx["anchors"], ctx["top_ranks"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)
