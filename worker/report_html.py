"""``report.html``: a finished job's :class:`~recalib.contract.Report` as one self-contained page.

Inline CSS and inline SVG plots (:mod:`worker.report_plots`), no script, no external reference: it
opens offline and from an email attachment. Rendered with Jinja2 with autoescape on: every string
from the report (layer names, file names, messages come from the user's model and files) is
escaped; only the SVG that :mod:`worker.report_plots` wrote (its text escaped there) is
inserted as markup.

:func:`write_report_html` is best effort: a job whose report cannot be drawn still succeeds (the
error is logged), because ``report.json`` and the checkpoint are what the job is for.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from jinja2 import Environment
from markupsafe import Markup

from recalib.contract import Interval, Metrics, Report
from recalib.verdict import explain
from worker import report_plots

logger = logging.getLogger(__name__)

REPORT_HTML_FILE = "report.html"

_METRICS = (
    ("top-1 accuracy", "top1", "{:.4f}"),
    ("top-5 accuracy", "top5", "{:.4f}"),
    ("mean IoU", "mean_iou", "{:.4f}"),
    ("pixel accuracy", "pixel_accuracy", "{:.4f}"),
    ("loss (nats)", "loss", "{:.4f}"),
    ("mean confidence", "mean_confidence", "{:.4f}"),
    ("mean entropy (nats)", "mean_entropy", "{:.4f}"),
    ("samples", "samples", "{:d}"),
    ("labeled pixels", "pixels", "{:d}"),
)
_HEADLINE = (("top-1", "top1"), ("mean IoU", "mean_iou"))

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>recalib report: {{ title }}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1a202c;margin:0 auto;
max-width:60rem;padding:1rem 1.5rem;background:#fff}
h1{font-size:1.4rem;margin:.2rem 0 .6rem}h2{font-size:1.1rem;margin:1.6rem 0 .4rem;
border-bottom:1px solid #e2e8f0;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.4rem 0}td,th{padding:.2rem .7rem;text-align:right;
border-bottom:1px solid #edf2f7}td:first-child,th:first-child{text-align:left}
.verdict{display:inline-block;padding:.1rem .6rem;border-radius:.8rem;font-weight:600;color:#fff}
.better{background:#2f855a}.worse{background:#c53030}.unchanged{background:#718096}
.unknown{background:#a0aec0}.inconclusive{background:#b7791f}.muted{color:#718096}
figure{margin:.4rem 0}
figure svg{width:100%;height:auto}dl{display:grid;grid-template-columns:max-content auto;
gap:.1rem 1rem;margin:.4rem 0}dt{color:#4a5568}dd{margin:0}
</style></head><body>
<h1>recalib {{ "drift check" if r.drift else "report" }}: {{ title }}</h1>
{% if r.drift %}{% set d = r.drift %}
<p><span class="verdict {{ 'worse' if d.recommend_recalibration else 'better' }}"
 id="drift-recommendation">
{{- "recalibrate" if d.recommend_recalibration else "no recalibration needed" }}</span>
drift score {{ "%.4f"|format(d.score) }} {{ ">" if d.recommend_recalibration else "≤" }} threshold
{{ "%.4g"|format(d.threshold) }} · {{ d.samples }} samples
{%- if not d.reliable %} <strong>(too few samples: the score is mostly sampling noise)</strong>
{%- endif %}</p>
<h2>Drift per BN layer</h2>
<p class="muted">Symmetric KL divergence between each channel's Gaussian on this data and the stored
running statistics, less what sampling noise alone would show; averaged over channels (nats).
Most moved: {{ d.most_moved|join(", ") }}.</p>
<table id="drift-layers"><tr><th>layer</th><th>type</th><th>channels</th><th>score</th>
<th>max channel</th><th>noise</th><th>mean shift (σ)</th><th>var ratio</th></tr>
{% for layer in d.layers %}<tr><td>{{ layer.name }}</td><td>{{ layer.type }}</td>
<td>{{ layer.channels }}</td><td>{{ "%.4f"|format(layer.score) }}</td>
<td>{{ "%.4f"|format(layer.max_channel_score) }}</td><td>{{ "%.4f"|format(layer.noise) }}</td>
<td>{{ "%.4f"|format(layer.mean_shift_std) }}</td><td>{{ "%.4f"|format(layer.var_ratio) }}</td></tr>
{% endfor %}</table>
{% else %}
<p><span class="verdict {{ r.verdict.value }}" id="verdict">{{ r.verdict.value }}</span>
{% if top1 %} {{ top1[2] }} {{ top1[0] }} → {{ top1[1] }}{% endif %}
{% if r.prediction_change is not none %}
 · {{ "%.1f"|format(100 * r.prediction_change) }}% of predictions changed{% endif %}
{% if r.output_change and r.output_change.relative_l2 is not none %}
 · outputs moved {{ "%.2f"|format(100 * r.output_change.relative_l2) }}% (relative L2)
{%- if r.output_change.shape_changed %}, {{ r.output_change.shape_changed }} output tensors
 changed shape{% endif %}{% endif %}</p>
<p id="verdict-basis" class="muted">{{ verdict_text }}</p>
<h2>Summary</h2>
<table id="metrics"><tr><th>metric</th><th>before</th><th>after</th></tr>
{% for label, before, after in metrics %}
<tr><td>{{ label }}</td><td>{{ before }}</td><td>{{ after }}</td></tr>{% endfor %}
</table>
{% if not metrics %}<p class="muted">No evaluation data: nothing was measured.</p>{% endif %}
<dl>
<dt>model</dt><dd>{{ r.model_format }}, {{ r.bn_layers }} BN layers recalibrated
{%- if r.skipped_layers %}, {{ r.skipped_layers|length }} skipped{% endif %}</dd>
<dt>calibration</dt><dd>{{ r.data.calibration_file }}: {{ r.calibration.samples }} of
{{ r.calibration.available_samples }} samples, {{ r.calibration.batches }} batches,
estimator {{ r.calibration.estimator.value }}
{%- if r.calibration.stopped_early %}, stopped early{% endif %}</dd>
<dt>evaluated on</dt><dd>{{ evaluated_on }}</dd>
{% if r.task %}<dt>task</dt><dd id="task">{{ r.task.task }} <span class="muted">({{ r.task.reason }}
{%- if r.task.output_key %}; logits at output[{{ r.task.output_key }}]{% endif %};
output {{ r.task.output }})</span></dd>{% endif %}
<dt>device</dt><dd>{{ r.device }}</dd>
<dt>time</dt><dd>{{ "%.2f"|format(r.timings_s.get("total", 0)) }} s
<span class="muted">({% for k, v in r.timings_s.items() if k != "total" %}{{ k }}
{{ "%.2f"|format(v) }} s{% if not loop.last %}, {% endif %}{% endfor %})</span></dd>
{% if r.checkpoint %}<dt>checkpoint</dt><dd>{{ r.checkpoint.file }} <span class="muted">sha256
{{ r.checkpoint.sha256[:16] }}…</span></dd>{% endif %}
{% if r.folded %}<dt>folded</dt><dd>{{ r.folded.artifact.file }}: {{ r.folded.folded }} folded,
max |diff| {{ "%.2e"|format(r.folded.max_abs_diff) }}</dd>{% endif %}
<dt>recalib</dt><dd>{{ r.recalib_version }}</dd>
</dl>
{% if r.estimate %}<h2>Label-free estimate</h2>
<p class="muted">Target top-1 estimated without target labels from the source set
({{ r.estimate.source_samples }} labeled samples, source top-1
{{ "%.4f"|format(r.estimate.source_top1) }}; method {{ r.estimate.method }}).</p>
<table id="estimate"><tr><th></th><th>top-1</th><th>95 % interval</th><th>bound</th>
<th>reliable</th><th>why</th></tr>
{% for name, side in (("before", r.estimate.before), ("after", r.estimate.after)) %}
<tr><td>{{ name }}</td><td>{{ "%.4f"|format(side.top1) if side.top1 is not none else "–" }}</td>
<td>[{{ "%.4f"|format(side.interval.low) }}, {{ "%.4f"|format(side.interval.high) }}]</td>
<td>≤ {{ "%.4f"|format(side.upper_bound) }}</td><td>{{ "yes" if side.reliable else "no" }}</td>
<td style="text-align:left">{{ side.reason }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Drift per BN layer</h2>
<p class="muted">How far each layer's running statistics moved: the mean shift in units of the old
running standard deviation, and the ratio of new to old variance.</p>
<figure id="layer-drift">{{ layer_svg }}</figure>
<details><summary>table ({{ r.layers|length }} layers)</summary><table id="layers">
<tr><th>layer</th><th>type</th><th>channels</th><th>mean shift (σ)</th><th>var ratio</th></tr>
{% for layer in r.layers %}<tr><td>{{ layer.name }}</td><td>{{ layer.type }}</td>
<td>{{ layer.channels }}</td><td>{{ "%.4f"|format(layer.mean_shift_std) }}</td>
<td>{{ "%.4f"|format(layer.var_ratio) }}</td></tr>{% endfor %}</table></details>
{% if r.skipped_layers %}<p>Skipped: {% for s in r.skipped_layers %}{{ s.name }} ({{ s.reason }})
{%- if not loop.last %}; {% endif %}{% endfor %}</p>{% endif %}
{% if class_svg %}<h2>{{ class_title }} per class</h2>
<figure id="per-class">{{ class_svg }}</figure>{% endif %}
{% if confidence_svg %}<h2>Confidence</h2>
<p class="muted">Distribution of the max-softmax probability over the evaluated samples.</p>
<figure id="confidence">{{ confidence_svg }}</figure>{% endif %}
{% endif %}
</body></html>
"""

_EVALUATED_ON = {
    "eval_file": "the evaluation file {}",
    "holdout": "a held-out part of the calibration data",
    "calibration": "the calibration samples themselves (no labels: label-free metrics only)",
    None: "nothing (no evaluation data)",
}

_environment = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
_template = _environment.from_string(_TEMPLATE)


def _format(value: float | int | None, spec: str) -> str:
    return "–" if value is None else spec.format(value)


_INTERVALS = {"top1": "top1_interval", "mean_iou": "mean_iou_interval"}
"""The metrics shown with their 95 % interval."""


def _with_interval(text: str, interval: Interval | None) -> str:
    return text if interval is None else f"{text} [{interval.low:.4f}, {interval.high:.4f}]"


def _metric_rows(before: Metrics | None, after: Metrics | None) -> list[tuple[str, str, str]]:
    rows = []
    for label, key, spec in _METRICS:
        values = [getattr(m, key) if m else None for m in (before, after)]
        if any(v is not None for v in values):
            texts = [_format(v, spec) for v in values]
            if key in _INTERVALS:
                texts = [
                    _with_interval(t, getattr(m, _INTERVALS[key]) if m else None)
                    for t, m in zip(texts, (before, after), strict=True)
                ]
            rows.append((label, *texts))
    return rows


def render_report_html(report: Report) -> str:
    """The page for ``report``; plots whose data the report lacks are left out."""
    before, after = report.before, report.after
    class_svg = confidence_svg = layer_svg = None
    class_title = "Accuracy"
    if report.layers:
        layer_svg = report_plots.layer_drift(report.layers)
    if before and after and before.per_class_accuracy and after.per_class_accuracy:
        class_svg = report_plots.per_class_accuracy(
            before.per_class_accuracy, after.per_class_accuracy
        )
    elif before and after and before.per_class_iou and after.per_class_iou:
        class_title = "IoU"
        class_svg = report_plots.per_class_accuracy(
            before.per_class_iou, after.per_class_iou, metric="IoU"
        )
    if before and after and before.confidence_histogram and after.confidence_histogram:
        confidence_svg = report_plots.confidence_histograms(
            before.confidence_histogram, after.confidence_histogram
        )
    top1 = None  # the metric the verdict compares: (before, after, name)
    for name, key in _HEADLINE:
        old, new = (getattr(m, key) if m else None for m in (before, after))
        if old is not None and new is not None:
            top1 = (f"{old:.4f}", f"{new:.4f}", name)
            break
    evaluated_on = _EVALUATED_ON.get(report.data.evaluated_on, "?")
    return _template.render(
        r=report,
        title=report.data.eval_file or report.data.calibration_file,
        top1=top1,
        verdict_text=explain(report),
        metrics=_metric_rows(before, after),
        evaluated_on=evaluated_on.format(report.data.eval_file),
        layer_svg=Markup(layer_svg) if layer_svg else None,
        class_svg=Markup(class_svg) if class_svg else None,
        class_title=class_title,
        confidence_svg=Markup(confidence_svg) if confidence_svg else None,
    )


def write_report_html(report: Report, out_dir: Path) -> Path | None:
    """Write ``out_dir/report.html`` atomically; on any failure log it and return None."""
    target = Path(out_dir) / REPORT_HTML_FILE
    try:
        page = render_report_html(report)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report-", suffix=".html")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(page)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except Exception:
        logger.exception("could not write %s (report.json is complete)", target)
        return None
    return target
