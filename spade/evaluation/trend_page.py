"""The trend page: one static HTML file (inline SVG, no scripts, opens from disk) with each gallery's time series,
its drift warnings and the flagged images of its last night linked to their score maps."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from spade.evaluation.report import esc, fmt

WIDTH, SCORE_HEIGHT, SHARE_HEIGHT, PAD = 760, 170, 90, 44


@dataclass
class Series:
    """One route's nights, in order, as the page draws them."""

    route: str
    days: list[str] = field(default_factory=list)
    p50: list[float | None] = field(default_factory=list)
    p95: list[float | None] = field(default_factory=list)
    flagged_share: list[float | None] = field(default_factory=list)
    above_2sd: list[float | None] = field(default_factory=list)
    warned: list[bool] = field(default_factory=list)
    normal_2sd: float | None = None  # the latest gallery's normal mean + 2 sd
    threshold: float | None = None
    last: dict[str, Any] = field(default_factory=dict)  # the last night's row
    flagged_images: list[dict[str, Any]] = field(default_factory=list)
    galleries: list[str] = field(default_factory=list)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def chart(days: list[str], lines: list[tuple[str, Sequence[float | None], str]], height: int,
          rules: Sequence[tuple[str, float | None, str]] = (), marks: Sequence[bool] = (), fixed: tuple[float, float] | None = None,
          label: str = "") -> str:
    """An SVG line chart over the nights: ``lines`` (name, values, colour), horizontal ``rules`` (name, y, colour),
    red dots on ``marks`` (warned nights)."""
    values = _finite([v for _, series, _ in lines for v in series] + [y for _, y, _ in rules if y is not None])
    low, high = fixed or ((min(values), max(values)) if values else (0.0, 1.0))
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    n = max(len(days), 1)
    x = lambda i: PAD + (WIDTH - 2 * PAD) * (i / (n - 1) if n > 1 else 0.5)  # noqa: E731
    y = lambda v: height - 18 - (height - 30) * (v - low) / (high - low)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" role="img" '
             f'aria-label="{esc(label)}"><rect width="100%" height="100%" fill="#fff" stroke="#ccc"/>']
    for name, value, colour in rules:
        if value is not None and math.isfinite(value):
            parts.append(f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="{colour}" '
                         f'stroke-dasharray="5,4"><title>{esc(name)} {fmt(value)}</title></line>')
    for name, series, colour in lines:
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(series) if v is not None and math.isfinite(v))
        if points:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}">'
                         f'<title>{esc(name)}</title></polyline>')
    first = lines[0][1] if lines else []
    for i, warned in enumerate(marks):
        if warned:
            v = first[i] if i < len(first) and first[i] is not None else high
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3.5" fill="#d62728"><title>{esc(days[i])}: warning'
                         '</title></circle>')
    parts.append(f'<text x="4" y="12" font-size="10">{fmt(high)}</text><text x="4" y="{height - 20}" font-size="10">'
                 f'{fmt(low)}</text>')
    if days:
        parts.append(f'<text x="{PAD}" y="{height - 4}" font-size="10">{esc(days[0])}</text>'
                     f'<text x="{WIDTH - PAD}" y="{height - 4}" font-size="10" text-anchor="end">{esc(days[-1])}</text>')
    legend = " · ".join(f'<tspan fill="{colour}">{esc(name)}</tspan>' for name, _, colour in [*lines, *rules])
    parts.append(f'<text x="{WIDTH / 2:.0f}" y="12" font-size="10" text-anchor="middle">{legend}</text></svg>')
    return "".join(parts)


def _link(url: str | None) -> str:
    if not url:
        return ""
    href = url if "://" in url else "file://" + url
    return f'<a href="{esc(href)}">score map</a>'


def render(root: str, series: list[Series], settings: dict[str, Any], generated_at: str) -> str:
    """The page for ``series`` (one per route)."""
    alerting = [s for s in series if s.last.get("warnings")]
    rows = "".join(f"<tr><td>{esc(s.route or '(one gallery)')}</td><td>{esc(s.last.get('day'))}</td>"
                   f"<td>{esc('; '.join(s.last.get('warnings') or []))}</td></tr>" for s in alerting)
    sections = []
    for s in series:
        status = ('<span class="alert">warning on the last night</span>' if s.last.get("warnings")
                  else '<span class="ok">clear</span>')
        scores = chart(s.days, [("median score", s.p50, "#1f77b4"), ("95th percentile", s.p95, "#9ecae1")], SCORE_HEIGHT,
                       [("normal mean + 2 sd", s.normal_2sd, "#2ca02c"), ("image threshold", s.threshold, "#d62728")],
                       s.warned, label=f"{s.route} scores")
        shares = chart(s.days, [("flagged share", s.flagged_share, "#d62728"),
                                ("above normal + 2 sd", s.above_2sd, "#ff7f0e")], SHARE_HEIGHT,
                       [("flagged alert", settings.get("flagged_alert"), "#999")], fixed=(0.0, 1.0),
                       label=f"{s.route} shares")
        flagged = "".join(f"<tr><td>{esc(r.get('uri'))}</td><td>{fmt(r.get('image_score'))}</td>"
                          f"<td>{_link(r.get('map_uri'))}</td></tr>" for r in s.flagged_images)
        last = s.last
        sections.append(
            f'<section><h2>{esc(s.route or "(one gallery)")} {status}</h2>'
            f'<p>{len(s.days)} night(s), galleries {esc(", ".join(s.galleries))}. Last night {esc(last.get("day"))}: '
            f'{last.get("images", 0)} images, {last.get("errors", 0)} errors, flagged {fmt(last.get("flagged_share"))}, '
            f'median score {fmt(last.get("p50"))}; KS against the previous nights p={fmt(last.get("p_recent"))}, '
            f'the last {settings.get("baseline")} nights against the first p={fmt(last.get("p_baseline"))}; '
            f'{fmt(last.get("share_above_median"))} of the last nights\' scores above the calibrated normal median. {esc("; ".join(last.get("warnings") or []))}</p>'
            f'{scores}<br>{shares}'
            + (f'<h3>Flagged on {esc(last.get("day"))}</h3><table><tr><th>image</th><th>score</th><th>map</th></tr>'
               f'{flagged}</table>' if flagged else "")
            + '</section>')
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>SPADE nightly trend</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:62em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%;text-align:left}}.alert{{color:#fff;background:#d62728;
padding:1px 6px;font-size:70%}}.ok{{color:#fff;background:#2ca02c;padding:1px 6px;font-size:70%}}
section{{margin-top:1.5em}}</style></head><body>
<h1>Nightly trend</h1><p>{esc(root)}: {len(series)} gallery route(s), {len(alerting)} warning on their last night.
Generated {esc(generated_at)}. Drift tests (two-sample Kolmogorov-Smirnov, p &lt; {settings.get("alpha")}, scores
up): each night against the previous {settings.get("window")} nights, and the last {settings.get("baseline")} nights
against the gallery's first {settings.get("baseline")} (D &ge; {settings.get("min_effect")}); flagged share alert
above {fmt(settings.get("flagged_alert"))}.</p>
{"<h2>Warnings on the last night</h2><table><tr><th>route</th><th>night</th><th>why</th></tr>" + rows + "</table>" if rows else "<p>No warnings on any last night.</p>"}
{"".join(sections)}
</body></html>
"""
