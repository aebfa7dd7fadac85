"""Model-level evaluation: what a model's outputs say before and after recalibration.

:mod:`.core` runs the passes (:func:`evaluate`); :mod:`.verdict` compares before and after;
:mod:`.task` decides what to measure from a probe output and the labels; :mod:`.outputs` finds
logits in any output structure; :mod:`.classification`, :mod:`.segmentation` and
:mod:`.label_free` accumulate the metrics of each kind.
"""

from worker.evaluation.classification import (
    CONFIDENCE_BINS,
    ClassificationAccumulator,
    Evaluation,
)
from worker.evaluation.core import (
    evaluate,
    forward_logits,
    infer_num_classes,
    max_output_diff,
    pad_batch,
    run_batch,
)
from worker.evaluation.label_free import ReferenceBuffers
from worker.evaluation.task import TaskPlan, resolve_task
from worker.evaluation.verdict import (
    MEAN_IOU_TOLERANCE,
    Judgement,
    decide_verdict,
    judge,
    prediction_change,
)

MetricsAccumulator = ClassificationAccumulator
"""The classification accumulator under its former name."""

__all__ = [
    "CONFIDENCE_BINS",
    "MEAN_IOU_TOLERANCE",
    "ClassificationAccumulator",
    "Evaluation",
    "Judgement",
    "MetricsAccumulator",
    "ReferenceBuffers",
    "TaskPlan",
    "decide_verdict",
    "evaluate",
    "forward_logits",
    "infer_num_classes",
    "judge",
    "max_output_diff",
    "pad_batch",
    "prediction_change",
    "resolve_task",
    "run_batch",
]
