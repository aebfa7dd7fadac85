"""A report's numbers as text, per task, for the summaries of ``recalib run`` and ``submit``.

Classification speaks of top-1 (and top-5, loss), segmentation of mean IoU and pixel accuracy,
task ``none`` of how far the outputs moved; the verdict is decided by top-1 or mean IoU.
"""

from __future__ import annotations

from recalib.contract import Report

_ROWS = {
    "classification": (
        ("top-1", "top1"),
        ("top-5", "top5"),
        ("loss (nats)", "loss"),
        ("confidence", "mean_confidence"),
        ("entropy (nats)", "mean_entropy"),
    ),
    "segmentation": (
        ("mean IoU", "mean_iou"),
        ("pixel accuracy", "pixel_accuracy"),
        ("loss (nats/px)", "loss"),
        ("confidence", "mean_confidence"),
        ("entropy (nats)", "mean_entropy"),
    ),
    "none": (("confidence", "mean_confidence"), ("entropy (nats)", "mean_entropy")),
}
_HEADLINE = {"classification": ("top1", "top-1 accuracy"), "segmentation": ("mean_iou", "mean IoU")}


def task_of(report: Report) -> str:
    """The task the report evaluated; reports from before tasks existed are classification."""
    return report.task.task if report.task is not None else "classification"


def metric_rows(report: Report) -> list[tuple[str, float | None, float | None]]:
    """(label, before, after) for every metric of the report's task that has a value."""
    rows = []
    for label, key in _ROWS[task_of(report)]:
        before, after = (getattr(m, key) if m else None for m in (report.before, report.after))
        if before is not None or after is not None:
            rows.append((label, before, after))
    return rows


def headline(report: Report) -> tuple[str, float, float] | None:
    """The metric the verdict compares, ``(name, before, after)``; None without one."""
    key, name = _HEADLINE.get(task_of(report), (None, ""))
    if key is None or report.before is None or report.after is None:
        return None
    before, after = getattr(report.before, key), getattr(report.after, key)
    if before is None or after is None:
        return None
    return name, before, after


def task_line(report: Report) -> str | None:
    """``task: segmentation (auto: ...; logits at output['out'])``, or None for older reports."""
    decision = report.task
    if decision is None:
        return None
    key = f"; logits at output[{decision.output_key!r}]" if decision.output_key else ""
    return f"task: {decision.task} ({decision.reason}{key})"


def output_change_text(report: Report) -> str | None:
    """``outputs moved 3.1% (relative L2), 4 tensors changed shape``, or None."""
    change = report.output_change
    if change is None:
        return None
    moved = "n/a" if change.relative_l2 is None else f"{change.relative_l2:.2%}"
    reshaped = f", {change.shape_changed} tensors changed shape" if change.shape_changed else ""
    return f"outputs moved {moved} (relative L2){reshaped}"
