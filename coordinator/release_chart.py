"""The training curve of a release (a small SVG the model card and the portal show):
per-site held-out AUC and loss over rounds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final
from xml.sax.saxutils import escape

__all__ = [
    "HELD_OUT_NOT_DP",
    "PALETTE",
    "panel",
    "training_curve_svg",
]


HELD_OUT_NOT_DP: Final = ("Held-out figures each site computed without noise: not covered by "
                          "the differential-privacy guarantee.")

PALETTE: Final = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def _curves(metrics: Mapping[int, Mapping[str, Mapping[str, float]]], up_to_round: int,
            final_round: int) -> tuple[dict[str, list[tuple[float, float]]],
                                       dict[str, list[tuple[float, float]]]]:
    """Per-site (model after round k, value) points: held-out AUC and held-out loss.

    No training loss is drawn: sites do not send it (it is not covered by DP-SGD's
    accounting), and one sent by an older site agent is ignored.
    """
    auc: dict[str, list[tuple[float, float]]] = {}
    loss: dict[str, list[tuple[float, float]]] = {}
    for number in sorted(metrics):
        for site, values in sorted(metrics[number].items()):
            # Evaluated at the start of round n: the model after round n - 1.
            for name, series in (("eval-auc", auc), ("eval-loss", loss)):
                if name in values and number - 1 <= up_to_round:
                    series.setdefault(site, []).append((number - 1, values[name]))
                if number == final_round == up_to_round and f"final-{name}" in values:
                    series.setdefault(site, []).append((number, values[f"final-{name}"]))
    return auc, loss


def panel(x0: float, title: str, series: Mapping[str, list[tuple[float, float]]],
           colours: Mapping[str, str], *, fixed_y: tuple[float, float] | None,
           x_label: str = "model after round") -> list[str]:
    """One 330 x 230 panel at ``x0``: a line and a dot per point of each series.

    Args:
        x0: The panel's left edge in the picture.
        title: Shown above the panel; escaped.
        series: Name -> (x, y) points; non-finite values are left out.
        colours: Name -> stroke colour.
        fixed_y: The y range, or None to fit the points.
        x_label: What the x axis counts; escaped.

    Returns:
        SVG elements.
    """
    w, h, top, left, bottom = 330.0, 230.0, 40.0, 45.0, 30.0
    px0, py0, pw, ph = x0 + left, top, w - left - 10, h - bottom
    out = [f'<text x="{x0 + w / 2:.1f}" y="22" text-anchor="middle" font-size="14" '
           f'font-weight="bold">{escape(title)}</text>',
           f'<rect x="{px0:.1f}" y="{py0:.1f}" width="{pw:.1f}" height="{ph:.1f}" '
           'fill="#fafafa" stroke="#999"/>']
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    if not points:
        out.append(f'<text x="{px0 + pw / 2:.1f}" y="{py0 + ph / 2:.1f}" text-anchor="middle" '
                   'font-size="12" fill="#666">no figures reported</text>')
        return out
    xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
    if fixed_y is not None:
        ymin, ymax = fixed_y
    else:
        ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
        pad = (ymax - ymin) * 0.1 or max(abs(ymax) * 0.1, 0.1)
        ymin, ymax = ymin - pad, ymax + pad
    xspan = (xmax - xmin) or 1.0

    def sx(x: float) -> float:
        return px0 + (x - xmin) / xspan * pw if xmax > xmin else px0 + pw / 2

    def sy(y: float) -> float:
        return py0 + ph - (min(max(y, ymin), ymax) - ymin) / (ymax - ymin) * ph

    for i in range(5):
        y = ymin + (ymax - ymin) * i / 4
        out.append(f'<line x1="{px0:.1f}" y1="{sy(y):.1f}" x2="{px0 + pw:.1f}" y2="{sy(y):.1f}" '
                   'stroke="#e0e0e0"/>')
        out.append(f'<text x="{px0 - 4:.1f}" y="{sy(y) + 4:.1f}" text-anchor="end" '
                   f'font-size="10">{y:.2f}</text>')
    for x in sorted({int(p[0]) for p in points}):
        out.append(f'<text x="{sx(x):.1f}" y="{py0 + ph + 14:.1f}" text-anchor="middle" '
                   f'font-size="10">{x}</text>')
    out.append(f'<text x="{px0 + pw / 2:.1f}" y="{py0 + ph + 27:.1f}" text-anchor="middle" '
               f'font-size="10" fill="#444">{escape(x_label)}</text>')
    for site, pts in sorted(series.items()):
        good = sorted(p for p in pts if math.isfinite(p[1]))
        if not good:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        colour = colours[site]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                   f'points="{coords}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>'
                for x, y in good]
    return out


def training_curve_svg(*, metrics: Mapping[int, Mapping[str, Mapping[str, float]]],
                       up_to_round: int, final_round: int, title: str) -> str:
    """Draw per-site held-out AUC and loss by round as a standalone SVG.

    The figures are each site's evaluation of the global model on its held-out split,
    reported without noise: the drawing says that they are not covered by the DP guarantee.

    Args:
        metrics: Round -> site -> metric name -> value, as the sites reported them.
        up_to_round: The version's round: later rounds are left out.
        final_round: The run's planned last round (its ``final-*`` evaluation is drawn when
            the version is that round's model).
        title: Shown at the top; escaped.

    Returns:
        SVG text (no script, no external reference).
    """
    auc, loss = _curves(metrics, up_to_round, final_round)
    sites = sorted(set(auc) | set(loss))
    colours = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sites)}
    legend_h = 18 * ((len(sites) + 3) // 4)
    height = 320 + legend_h
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="700" height="{height}" '
             f'viewBox="0 0 700 {height}" font-family="sans-serif" role="img">',
             f"<title>{escape(title)}</title>",
             '<rect width="100%" height="100%" fill="white"/>']
    parts += panel(10, "Held-out AUC per site", auc, colours, fixed_y=(0.0, 1.0))
    parts += panel(360, "Held-out loss per site", loss, colours, fixed_y=None)
    for i, site in enumerate(sites):
        x, y = 20 + (i % 4) * 170, 292 + 18 * (i // 4)
        parts.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" '
                     f'fill="{colours[site]}"/>')
        parts.append(f'<text x="{x + 17}" y="{y + 1}" font-size="12">{escape(site)}</text>')
    parts.append(f'<text x="20" y="{height - 10}" font-size="11" fill="#444">'
                 f"{escape(HELD_OUT_NOT_DP)}</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
