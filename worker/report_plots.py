"""The plots of ``report.html`` as inline SVG strings, drawn with matplotlib's object API.

Each figure is a :class:`matplotlib.figure.Figure` rendered by its own ``FigureCanvasSVG``: no
pyplot, no backend switch, no global state written. matplotlib itself is not thread-safe (its font
and text caches are shared): callers hold :data:`DRAW_LOCK` while drawing. Text is drawn as paths
(matplotlib's default ``svg.fonttype``), so the SVG needs no font and shows the same everywhere;
user-controlled strings (layer names) reach the SVG only as glyph outlines and as XML comments
that matplotlib escapes.

Every mark carries an ``id`` (matplotlib's ``gid``) naming what it shows: ``shift-<i>`` and
``var-<i>`` (layer ``i``), ``class-before-<k>``/``class-after-<k>`` (class ``k``),
``conf-before-<b>``/``conf-after-<b>`` (histogram bin ``b``); the prefixes differ per plot, so
the ids stay unique on a page holding all of them.
"""

from __future__ import annotations

import io
import itertools
import math
import threading
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

from recalib.contract import ConfidenceHistogram, LayerChange

BEFORE_COLOR = "#a0aec0"
AFTER_COLOR = "#2b6cb0"
WIDTH_IN = 8.0
MAX_CLASS_BARS = 50
"""Above this many classes, per-class accuracy is a scatter (after vs before), one dot each."""
DRAW_LOCK = threading.Lock()
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}
"""No RDF metadata block (namespace URLs and a date) in the SVG."""


def _figure(height_in: float) -> Figure:
    figure = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
    FigureCanvasSVG(figure)
    return figure


def to_svg(figure: Figure) -> str:
    """The figure as an ``<svg>`` element (no XML prolog or doctype), ready to inline in HTML."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata=_NO_METADATA)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _style(axes: Axes) -> None:
    axes.spines[["top", "right"]].set_visible(False)
    axes.tick_params(labelsize=8)
    axes.grid(axis="x", color="#e2e8f0", linewidth=0.6)
    axes.set_axisbelow(True)


def layer_drift(layers: Sequence[LayerChange]) -> str:
    """Two horizontal bar charts sharing the layer axis: mean shift (in old stds), variance ratio
    (log scale, bars from 1)."""
    figure = _figure(1.2 + 0.22 * len(layers))
    shift_axes, var_axes = figure.subplots(1, 2, sharey=True)
    positions = range(len(layers))
    shift_values = [layer.mean_shift_std for layer in layers]
    shifts = shift_axes.barh(positions, shift_values, color=AFTER_COLOR)
    ratios = [layer.var_ratio for layer in layers]
    logs = [math.log10(max(r, 1e-12)) for r in ratios]
    variances = var_axes.barh(positions, logs, color=[_ratio_color(r) for r in ratios])
    for index, (shift, variance) in enumerate(zip(shifts, variances, strict=True)):
        shift.set_gid(f"shift-{index}")
        variance.set_gid(f"var-{index}")
    shift_axes.set_yticks(
        list(positions), [_short(layer.name) for layer in layers], fontsize=7, parse_math=False
    )
    shift_axes.invert_yaxis()
    shift_axes.set_xlabel("mean shift, old running stds (RMS over channels)", fontsize=8)
    var_axes.axvline(0, color="#4a5568", linewidth=0.8)
    limit = max(max((abs(v) for v in logs), default=0.0), math.log10(2.0)) * 1.1
    var_axes.set_xlim(-limit, limit)
    ticks = [t for t in (-3, -2, -1, -math.log10(2), 0, math.log10(2), 1, 2, 3) if abs(t) <= limit]
    var_axes.set_xticks(ticks, [f"{10**t:.3g}×" for t in ticks])
    var_axes.set_xlabel("new var / old var (geometric mean, log scale)", fontsize=8)
    for axes in (shift_axes, var_axes):
        _style(axes)
    return to_svg(figure)


def _ratio_color(ratio: float) -> str:
    return AFTER_COLOR if ratio >= 1 else "#dd6b20"


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def per_class_accuracy(
    before: Sequence[float | None], after: Sequence[float | None], metric: str = "top-1 accuracy"
) -> str:
    """Grouped bars (before, after) per class; a scatter of after vs before above
    ``MAX_CLASS_BARS`` classes. Classes without samples get no mark. ``metric`` names the values
    (``IoU`` for segmentation)."""
    classes = max(len(before), len(after))
    if classes > MAX_CLASS_BARS:
        return _class_scatter(before, after, metric)
    figure = _figure(2.8)
    axes = figure.subplots()
    width = 0.4
    for label, values, offset, color in (
        ("before", before, -width / 2, BEFORE_COLOR),
        ("after", after, width / 2, AFTER_COLOR),
    ):
        drawn = [(k, value) for k, value in enumerate(values) if value is not None]
        bars = axes.bar(
            [k + offset for k, _ in drawn], [v for _, v in drawn], width, color=color, label=label
        )
        for (k, _), bar in zip(drawn, bars, strict=True):
            bar.set_gid(f"class-{label}-{k}")
    axes.set_xticks(range(classes), [str(k) for k in range(classes)])
    axes.set_xlabel("class (label index)", fontsize=8)
    axes.set_ylabel(metric, fontsize=8)
    axes.set_ylim(0, 1.05)
    _finish(axes)
    return to_svg(figure)


def _class_scatter(
    before: Sequence[float | None], after: Sequence[float | None], metric: str
) -> str:
    figure = _figure(4.5)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="#cbd5e0", linewidth=0.8)
    for k, (b, a) in enumerate(zip(before, after, strict=False)):
        if b is None or a is None:
            continue
        (dot,) = axes.plot([b], [a], "o", color=AFTER_COLOR, markersize=3, alpha=0.7)
        dot.set_gid(f"class-after-{k}")
    axes.set_xlabel(f"{metric} before (per class)", fontsize=8)
    axes.set_ylabel("after", fontsize=8)
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_aspect("equal")
    _style(axes)
    return to_svg(figure)


def confidence_histograms(before: ConfidenceHistogram, after: ConfidenceHistogram) -> str:
    """Before and after side by side over the same bins, as fractions of the samples."""
    figure = _figure(2.6)
    axes = figure.subplots()
    edges = after.bin_edges
    widths = [high - low for low, high in itertools.pairwise(edges)]
    for label, histogram, color, shift in (
        ("before", before, BEFORE_COLOR, 0.0),
        ("after", after, AFTER_COLOR, 0.5),
    ):
        total = max(sum(histogram.counts), 1)
        bars = axes.bar(
            [low + shift * width for low, width in zip(edges, widths, strict=False)],
            [count / total for count in histogram.counts],
            [width / 2 for width in widths],
            align="edge",
            color=color,
            label=label,
        )
        for b, bar in enumerate(bars):
            bar.set_gid(f"conf-{label}-{b}")
    axes.set_xlim(edges[0], edges[-1])
    axes.set_xlabel("max-softmax probability (confidence)", fontsize=8)
    axes.set_ylabel("fraction of samples", fontsize=8)
    _finish(axes)
    return to_svg(figure)


def _finish(axes: Axes) -> None:
    _style(axes)
    axes.grid(axis="x", visible=False)
    axes.grid(axis="y", color="#e2e8f0", linewidth=0.6)
    axes.legend(fontsize=8, frameon=False, loc="lower left", bbox_to_anchor=(0, 1), ncols=2)
