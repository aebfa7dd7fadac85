"""The plots of ``report.html`` as inline SVG strings, written directly (no plotting library).

Each plot is a small, fixed layout of bars, dots, axes and labels: a few hundred elements built as
text in well under a millisecond per plot (matplotlib took 0.2-0.3 s per figure, most of a small
job's wall time: ``docs/benchmarks/service.md``). Text is SVG ``<text>`` in the page's sans-serif
font; every user-controlled string (layer names) is XML-escaped here, and nothing of the report
becomes an attribute other than numbers and the fixed ids below. No state is shared: callers may
draw from several threads.

Every mark carries an ``id`` naming what it shows: ``shift-<i>`` and ``var-<i>`` (layer ``i``),
``class-before-<k>``/``class-after-<k>`` (class ``k``), ``conf-before-<b>``/``conf-after-<b>``
(histogram bin ``b``); the prefixes differ per plot, so the ids stay unique on a page holding all
of them.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from recalib.contract import ConfidenceHistogram, LayerChange

BEFORE_COLOR = "#a0aec0"
AFTER_COLOR = "#2b6cb0"
SHRINK_COLOR = "#dd6b20"
GRID_COLOR = "#e2e8f0"
AXIS_COLOR = "#4a5568"
WIDTH_PX = 800
MAX_CLASS_BARS = 50
"""Above this many classes, per-class accuracy is a scatter (after vs before), one dot each."""
_FONT_PX = 11
_CHAR_PX = 6.2
"""Width of one label character at ``_FONT_PX`` (sans-serif, average), for the label margin."""


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if math.isfinite(value) else "0"


@dataclass
class _Svg:
    """Elements of one ``<svg>``; coordinates in px, y down."""

    width: float
    height: float
    parts: list[str] = field(default_factory=list)

    def rect(self, x: float, y: float, w: float, h: float, fill: str, gid: str = "") -> None:
        ident = f' id="{gid}"' if gid else ""
        self.parts.append(
            f'<rect{ident} x="{_num(x)}" y="{_num(y)}" width="{_num(max(w, 0.0))}" '
            f'height="{_num(max(h, 0.0))}" fill="{fill}"/>'
        )

    def circle(self, x: float, y: float, r: float, fill: str, gid: str) -> None:
        self.parts.append(
            f'<circle id="{gid}" cx="{_num(x)}" cy="{_num(y)}" r="{_num(r)}" fill="{fill}" '
            'fill-opacity="0.7"/>'
        )

    def line(self, x1: float, y1: float, x2: float, y2: float, color: str = AXIS_COLOR) -> None:
        self.parts.append(
            f'<line x1="{_num(x1)}" y1="{_num(y1)}" x2="{_num(x2)}" y2="{_num(y2)}" '
            f'stroke="{color}" stroke-width="0.8"/>'
        )

    def text(
        self,
        x: float,
        y: float,
        content: str,
        *,
        anchor: str = "middle",
        size: float = _FONT_PX,
        rotate: bool = False,
    ) -> None:
        turn = f' transform="rotate(-90 {_num(x)} {_num(y)})"' if rotate else ""
        self.parts.append(
            f'<text x="{_num(x)}" y="{_num(y)}" font-size="{_num(size)}" text-anchor="{anchor}"'
            f"{turn}>{html.escape(content, quote=True)}</text>"
        )

    def render(self) -> str:
        body = "".join(self.parts)
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_num(self.width)} '
            f'{_num(self.height)}" width="{_num(self.width)}" height="{_num(self.height)}" '
            f'font-family="system-ui,sans-serif" fill="#1a202c" role="img">{body}</svg>'
        )


@dataclass(frozen=True)
class _Scale:
    """A linear map from data ``lo..hi`` to pixels ``start..end``."""

    lo: float
    hi: float
    start: float
    end: float

    def __call__(self, value: float) -> float:
        span = self.hi - self.lo or 1.0
        clipped = min(max(value, self.lo), self.hi)
        return self.start + (clipped - self.lo) / span * (self.end - self.start)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2 or 5 × 10^k apart) from ``lo`` up: the last is the
    first such value at or above ``hi``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while True:
        ticks.append(round(value, 12))
        if value >= hi - step * 1e-9:
            return ticks
        value += step


def _tick_label(value: float) -> str:
    return f"{value:.6g}"


def _x_axis(
    svg: _Svg,
    scale: _Scale,
    ticks: Sequence[float],
    labels: Sequence[str],
    top: float,
    bottom: float,
    title: str,
) -> None:
    """Vertical grid lines at ``ticks``, their labels and ``title`` under ``bottom``."""
    for tick, label in zip(ticks, labels, strict=True):
        x = scale(tick)
        svg.line(x, top, x, bottom, GRID_COLOR)
        svg.text(x, bottom + 13, label, size=10)
    svg.line(scale.start, bottom, scale.end, bottom)
    svg.text((scale.start + scale.end) / 2, bottom + 28, title)


def _y_axis(svg: _Svg, scale: _Scale, left: float, right: float, title: str) -> None:
    """Horizontal grid lines at round values of ``scale``, their labels and ``title``."""
    for tick in nice_ticks(scale.lo, scale.hi):
        if tick > scale.hi + 1e-9:
            continue
        y = scale(tick)
        svg.line(left, y, right, y, GRID_COLOR)
        svg.text(left - 4, y + 3.5, _tick_label(tick), anchor="end", size=10)
    svg.line(left, scale.start, left, scale.end)
    svg.text(left - 36, (scale.start + scale.end) / 2, title, rotate=True)


def _legend(svg: _Svg, x: float, y: float) -> None:
    for offset, (label, color) in enumerate((("before", BEFORE_COLOR), ("after", AFTER_COLOR))):
        left = x + offset * 80
        svg.rect(left, y - 9, 14, 9, color)
        svg.text(left + 18, y, label, anchor="start", size=10)


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def layer_drift(layers: Sequence[LayerChange]) -> str:
    """Two horizontal bar charts sharing the layer axis: mean shift (in old stds), variance ratio
    (log scale, bars from 1)."""
    names = [_short(layer.name) for layer in layers]
    label_px = min(max((len(n) for n in names), default=4) * _CHAR_PX, 40 * _CHAR_PX) + 10
    row_px, top = 18.0, 8.0
    bottom = top + row_px * max(len(layers), 1)
    svg = _Svg(WIDTH_PX, bottom + 40)
    gap = 30.0
    panel = (WIDTH_PX - label_px - gap - 10) / 2
    shifts = [
        layer.mean_shift_std if math.isfinite(layer.mean_shift_std) else 0.0 for layer in layers
    ]
    shift_ticks = nice_ticks(0.0, max([*shifts, 1e-3]))
    shift_scale = _Scale(0.0, shift_ticks[-1], label_px, label_px + panel)
    ratios = [layer.var_ratio for layer in layers]
    logs = [math.log10(max(r, 1e-12)) if math.isfinite(r) else 0.0 for r in ratios]
    limit = max(max((abs(v) for v in logs), default=0.0), math.log10(2.0)) * 1.1
    var_start = label_px + panel + gap
    var_scale = _Scale(-limit, limit, var_start, var_start + panel)
    var_ticks = [
        t for t in (-3, -2, -1, -math.log10(2), 0, math.log10(2), 1, 2, 3) if abs(t) <= limit
    ]
    _x_axis(
        svg,
        shift_scale,
        shift_ticks,
        [_tick_label(t) for t in shift_ticks],
        top,
        bottom,
        "mean shift, old running stds (RMS over channels)",
    )
    _x_axis(
        svg,
        var_scale,
        var_ticks,
        [f"{10**t:.3g}×" for t in var_ticks],
        top,
        bottom,
        "new var / old var (geometric mean, log scale)",
    )
    for index, (name, shift, ratio, log) in enumerate(
        zip(names, shifts, ratios, logs, strict=True)
    ):
        y = top + index * row_px
        svg.text(label_px - 6, y + row_px / 2 + 3.5, name, anchor="end", size=10)
        svg.rect(
            label_px,
            y + 3,
            shift_scale(shift) - label_px,
            row_px - 6,
            AFTER_COLOR,
            f"shift-{index}",
        )
        x0, x1 = sorted((var_scale(0.0), var_scale(log)))
        color = AFTER_COLOR if ratio >= 1 else SHRINK_COLOR
        svg.rect(x0, y + 3, x1 - x0, row_px - 6, color, f"var-{index}")
    svg.line(var_scale(0.0), top, var_scale(0.0), bottom)
    return svg.render()


def per_class_accuracy(
    before: Sequence[float | None], after: Sequence[float | None], metric: str = "top-1 accuracy"
) -> str:
    """Grouped bars (before, after) per class; a scatter of after vs before above
    ``MAX_CLASS_BARS`` classes. Classes without samples get no mark. ``metric`` names the values
    (``IoU`` for segmentation)."""
    classes = max(len(before), len(after))
    if classes > MAX_CLASS_BARS:
        return _class_scatter(before, after, metric)
    svg = _Svg(WIDTH_PX, 280)
    left, right, top, bottom = 60.0, WIDTH_PX - 10.0, 30.0, 240.0
    y = _Scale(0.0, 1.05, bottom, top)
    _y_axis(svg, y, left, right, metric)
    slot = (right - left) / max(classes, 1)
    width = slot * 0.4
    for label, values, offset, color in (
        ("before", before, -width, BEFORE_COLOR),
        ("after", after, 0.0, AFTER_COLOR),
    ):
        for k, value in enumerate(values):
            if value is None:
                continue
            x = left + (k + 0.5) * slot + offset
            svg.rect(x, y(value), width, bottom - y(value), color, f"class-{label}-{k}")
    for k in range(classes):
        svg.text(left + (k + 0.5) * slot, bottom + 13, str(k), size=10)
    svg.text((left + right) / 2, bottom + 30, "class (label index)")
    _legend(svg, left, 16)
    return svg.render()


def _class_scatter(
    before: Sequence[float | None], after: Sequence[float | None], metric: str
) -> str:
    size = 400.0
    svg = _Svg(WIDTH_PX, size + 60)
    left = (WIDTH_PX - size) / 2
    top, bottom = 10.0, 10.0 + size
    x = _Scale(-0.02, 1.02, left, left + size)
    y = _Scale(-0.02, 1.02, bottom, top)
    svg.line(x(0), y(0), x(1), y(1), GRID_COLOR)
    ticks = nice_ticks(0.0, 1.0)
    _x_axis(
        svg, x, ticks, [_tick_label(t) for t in ticks], top, bottom, f"{metric} before (per class)"
    )
    _y_axis(svg, y, left, left + size, "after")
    for k, (b, a) in enumerate(zip(before, after, strict=False)):
        if b is None or a is None:
            continue
        svg.circle(x(b), y(a), 3.0, AFTER_COLOR, f"class-after-{k}")
    return svg.render()


def confidence_histograms(before: ConfidenceHistogram, after: ConfidenceHistogram) -> str:
    """Before and after side by side over the same bins, as fractions of the samples."""
    edges = after.bin_edges
    svg = _Svg(WIDTH_PX, 260)
    left, right, top, bottom = 60.0, WIDTH_PX - 10.0, 30.0, 220.0
    x = _Scale(edges[0], edges[-1], left, right)
    fractions = {
        label: [count / max(sum(h.counts), 1) for count in h.counts]
        for label, h in (("before", before), ("after", after))
    }
    highest = max([*fractions["before"], *fractions["after"], 1e-3])
    y = _Scale(0.0, nice_ticks(0.0, highest)[-1], bottom, top)
    _y_axis(svg, y, left, right, "fraction of samples")
    ticks = nice_ticks(edges[0], edges[-1])
    _x_axis(
        svg,
        x,
        ticks,
        [_tick_label(t) for t in ticks],
        top,
        bottom,
        "max-softmax probability (confidence)",
    )
    for label, color, shift in (("before", BEFORE_COLOR, 0.0), ("after", AFTER_COLOR, 0.5)):
        for b, ((low, high), fraction) in enumerate(
            zip(itertools.pairwise(edges), fractions[label], strict=False)
        ):
            width = high - low
            start = low + shift * width
            svg.rect(
                x(start),
                y(fraction),
                x(start + width / 2) - x(start),
                bottom - y(fraction),
                color,
                f"conf-{label}-{b}",
            )
    _legend(svg, left, 16)
    return svg.render()
