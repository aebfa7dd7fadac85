"""Assembling and writing ``report.json``: timings, the data split, the report itself."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import recalib
from recalib import defaults
from recalib.contract import (
    Artifact,
    CalibrationSummary,
    Convergence,
    DataSplit,
    DriftLayer,
    DriftReport,
    Estimate,
    FoldReport,
    JobKind,
    JobSpec,
    LayerChange,
    OutputChange,
    PriorChoice,
    Report,
    SkippedLayer,
    TaskDecision,
    Verdict,
)
from recalib.verdict import estimate_verdict
from worker.devices import describe_device
from worker.evaluation import Evaluation, judge, prediction_change
from worker.evaluation.estimate import estimate
from worker.formats.samples import MAX_SKIPPED_EXAMPLES
from worker.report_html import write_report_html

if TYPE_CHECKING:
    from worker.engine import RecalibrationResult
    from worker.engine.drift import DriftResult
    from worker.evaluation import TaskPlan
    from worker.formats.models import LoadedModel
    from worker.splits import DataPlan

REPORT_FILE = "report.json"


class Timer:
    """Wall-clock seconds per named step; :meth:`finish` adds ``total`` since construction."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.timings_s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.timings_s[name] = round(time.perf_counter() - start, 4)

    def finish(self) -> dict[str, float]:
        return {**self.timings_s, "total": round(time.perf_counter() - self._start, 4)}


def data_split(plan: DataPlan, spec: JobSpec) -> DataSplit:
    """``report.data``: which samples calibrated and which evaluated, and what archives skipped.

    ``calibration_indices`` are listed whenever a subset calibrated (holdout or ``max_samples``),
    ``eval_indices`` whenever calibration-file samples were evaluated (holdout, or unlabeled data
    evaluated on itself); both sorted.
    """
    subset = len(plan.calibration_indices) < plan.calibration.num_samples
    sources = [plan.calibration]
    if plan.eval_set is not plan.calibration:
        sources.append(plan.eval_set)
    examples = [example for source in sources for example in source.skipped_examples]
    return DataSplit(
        calibration_file=Path(spec.calibration_path).name,
        eval_file=Path(spec.eval_path).name if spec.eval_path else None,
        holdout_fraction=plan.holdout_fraction,
        calibration_indices=sorted(plan.calibration_indices) if subset else None,
        eval_indices=plan.eval_indices if plan.evaluated_on != "eval_file" else None,
        evaluated_on=plan.evaluated_on,  # type: ignore[arg-type]
        skipped_entries=sum(source.skipped_entries for source in sources),
        skipped_examples=examples[:MAX_SKIPPED_EXAMPLES],
    )


def build_report(
    spec: JobSpec,
    *,
    loaded: LoadedModel,
    plan: DataPlan,
    result: RecalibrationResult,
    before: Evaluation,
    after: Evaluation,
    checkpoint: Artifact,
    folded: FoldReport | None,
    device: torch.device,
    timings_s: dict[str, float],
    task: TaskPlan | None = None,
    source: Evaluation | None = None,
) -> Report:
    """The :class:`Report` of one finished job; ``task`` is what the evaluation measured;
    ``source`` the original model on a labeled source set (the label-free estimate, which
    gives the verdict when the target has no labels)."""
    judgement = judge(before, after)
    estimate = label_free_estimate(source, before, after)
    verdict, basis = judgement.verdict, judgement.basis
    if basis is None and estimate is not None:
        verdict, basis = estimate_verdict(estimate), "estimate"
    return Report(
        recalib_version=recalib.__version__,
        model_format=loaded.format,
        bn_layers=len(result.layers),
        skipped_layers=[SkippedLayer(**asdict(layer)) for layer in result.skipped],
        calibration=CalibrationSummary(
            samples=result.samples,
            batches=result.batches,
            available_samples=plan.available_samples,
            stopped_early=result.stopped_early,
            estimator=spec.options.estimator,
            merged_batches=result.merged_batches,
            prior=PriorChoice(**asdict(result.prior)) if result.prior else None,
            convergence=Convergence(**asdict(result.convergence)) if result.convergence else None,
        ),
        before=judgement.before,
        after=judgement.after,
        prediction_change=prediction_change(before.predictions, after.predictions),
        verdict=verdict,
        verdict_basis=basis,
        significance=judgement.significance,
        estimate=estimate,
        layers=[LayerChange(**asdict(change)) for change in result.changes],
        checkpoint=checkpoint,
        folded=folded,
        data=data_split(plan, spec),
        options=spec.options,
        device=describe_device(device),
        timings_s=timings_s,
        task=_task_decision(task),
        output_change=after.output_change
        if isinstance(after.output_change, OutputChange)
        else None,
    )


def build_drift_report(
    spec: JobSpec,
    *,
    loaded: LoadedModel,
    plan: DataPlan,
    indices: list[int],
    result: DriftResult,
    device: torch.device,
    timings_s: dict[str, float],
) -> Report:
    """The :class:`Report` of a drift job: ``drift`` filled, no evaluation, no checkpoint."""
    threshold = spec.options.drift_threshold
    calibration = plan.calibration
    subset = len(indices) < calibration.num_samples
    return Report(
        kind=JobKind.drift,
        recalib_version=recalib.__version__,
        model_format=loaded.format,
        bn_layers=len(result.layers),
        skipped_layers=[SkippedLayer(**asdict(layer)) for layer in result.skipped],
        calibration=CalibrationSummary(
            samples=result.samples,
            batches=result.batches,
            available_samples=calibration.num_samples,
            estimator=spec.options.estimator,
        ),
        before=None,
        after=None,
        prediction_change=None,
        verdict=Verdict.unknown,
        layers=[],
        checkpoint=None,
        data=DataSplit(
            calibration_file=Path(spec.calibration_path).name,
            eval_file=None,
            calibration_indices=indices if subset else None,
            skipped_entries=calibration.skipped_entries,
            skipped_examples=calibration.skipped_examples[:MAX_SKIPPED_EXAMPLES],
        ),
        options=spec.options,
        device=describe_device(device),
        timings_s=timings_s,
        drift=DriftReport(
            score=result.score,
            threshold=threshold,
            recommend_recalibration=result.score > threshold,
            samples=result.samples,
            reliable=result.samples >= defaults.DRIFT_MIN_SAMPLES,
            most_moved=[layer.name for layer in result.most_moved(defaults.DRIFT_TOP_LAYERS)],
            layers=[DriftLayer(**asdict(layer)) for layer in result.layers],
        ),
    )


def label_free_estimate(
    source: Evaluation | None, before: Evaluation, after: Evaluation
) -> Estimate | None:
    """``report.estimate`` from the source evaluation and the target's before/after passes;
    None without a source set or per-sample scores."""
    if source is None or source.labels is None:
        return None
    scored = []
    for evaluation in (source, before, after):
        if evaluation.predictions is None or evaluation.negative_entropy is None:
            return None
        scored.append((evaluation.predictions.numpy(), evaluation.negative_entropy.numpy()))
    return estimate(
        (*scored[0], source.labels.numpy()), scored[1], scored[2], int(source.num_classes or 0)
    )


def _task_decision(task: TaskPlan | None) -> TaskDecision | None:
    if task is None:
        return None
    return TaskDecision(
        task=task.task,
        requested=task.requested,
        output_key=task.output_key,
        output=task.output,
        reason=task.reason,
    )


def write_report(report: Report, out_dir: Path) -> Path:
    """Write ``out_dir/report.json`` atomically (a reader never sees half a file), then
    ``report.html`` (best effort: :func:`worker.report_html.write_report_html`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / REPORT_FILE
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(report.model_dump_json(indent=2))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_report_html(report, out_dir)
    return target
