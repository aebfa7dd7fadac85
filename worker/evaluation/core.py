"""Model quality on one data set: the evaluation passes.

:func:`evaluate` streams a loader of ``(inputs, labels)`` batches through a model (no gradients)
and returns :class:`~recalib.contract.Metrics` plus the top-1 prediction of every sample (pixel),
so that :func:`~worker.evaluation.verdict.prediction_change` can compare two runs over the same
samples. What is measured depends on the :class:`~worker.evaluation.task.TaskPlan`:
classification (:mod:`.classification`), segmentation (:mod:`.segmentation`) or label-free only
(task ``none``: samples, and entropy/confidence when the output has logits). With ``reference``
buffers (the statistics before recalibration) every batch also runs with those, and the relative
change of all outputs is measured (:mod:`.label_free`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from recalib.contract import Metrics
from recalib.errors import InvalidModelError, JobCancelledError
from worker.devices import model_device
from worker.engine.inputs import CallFn, batch_size, call_model, leaves, move_batch
from worker.evaluation.classification import ClassificationAccumulator, Evaluation
from worker.evaluation.label_free import OutputChangeAccumulator, ReferenceBuffers
from worker.evaluation.outputs import pad_inputs, trim_outputs
from worker.evaluation.segmentation import SegmentationAccumulator
from worker.evaluation.task import TaskPlan

ProgressCallback = Callable[[int, int | None], None]
Batch = tuple[Any, torch.Tensor]
CLASSIFIER = TaskPlan(
    "classification", "classification", None, True, None, "tensor", "default", output_rank=2
)
"""The plan of a plain classifier: the output itself is the (N, classes) logits."""


class _SampleCounter:
    """The accumulator of an output without logits: samples only."""

    def __init__(self) -> None:
        self.samples = 0

    def update(self, logits: Any, labels: torch.Tensor) -> None:
        self.samples += int(labels.shape[0])

    def result(self) -> Evaluation:
        if self.samples == 0:
            raise InvalidModelError("no samples to evaluate: the evaluation data is empty")
        return Evaluation(metrics=Metrics(samples=self.samples), predictions=None)


def _accumulator(plan: TaskPlan, labeled: bool, ignore_index: int) -> Any:
    labeled = labeled and plan.task != "none"
    if not plan.has_logits:
        return _SampleCounter()
    if plan.task == "segmentation" or (plan.task == "none" and plan.output_rank == 4):
        return SegmentationAccumulator(labeled=labeled, ignore_index=ignore_index)
    return ClassificationAccumulator(labeled=labeled)


def forward_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)``, checked to be finite (N, classes) floating-point logits.

    Raises:
        InvalidModelError: the output is not a 2-D float tensor with one row per input, or it
            holds NaN/inf.
    """
    output = model(inputs)
    if not isinstance(output, torch.Tensor):
        raise InvalidModelError(
            f"the model returned {type(output).__name__}, expected a (batch, classes) tensor of "
            "logits; wrap the model so forward() returns the classification logits only"
        )
    if output.ndim != 2 or not output.is_floating_point() or output.shape[0] != inputs.shape[0]:
        raise InvalidModelError(
            f"the model's output has shape {tuple(output.shape)} and dtype {output.dtype}, "
            f"expected ({inputs.shape[0]}, classes) floating-point logits for a batch of "
            f"{inputs.shape[0]}; recalib evaluates classifiers only"
        )
    return _finite(output)


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def pad_batch(inputs: torch.Tensor, min_batch_size: int) -> torch.Tensor:
    """``inputs`` with its last sample repeated up to ``min_batch_size`` rows (eval mode only:
    there each sample's output is independent of the others, so padding rows change nothing)."""
    return pad_inputs(inputs, min_batch_size)


def run_batch(model: nn.Module, inputs: Any, min_batch_size: int, call_fn: CallFn) -> Any:
    """The output of ``inputs``, padded to ``min_batch_size`` for the call, padding dropped."""
    samples = batch_size(inputs)
    padded = pad_inputs(inputs, min_batch_size)
    return trim_outputs(call_fn(model, padded), batch_size(padded), samples)


def checked_logits(plan: TaskPlan, output: Any, samples: int) -> torch.Tensor | None:
    """The logits of one batch's output under ``plan``, checked: the rank the plan was decided
    on, one row per sample, floating point, finite.

    Raises:
        InvalidModelError: a batch whose output differs from the probe's, or NaN/inf logits.
    """
    logits = plan.logits(output)
    if logits is None:
        return None
    rank = plan.output_rank or (4 if plan.task == "segmentation" else 2)
    fits = (
        isinstance(logits, torch.Tensor)
        and logits.is_floating_point()
        and logits.ndim == rank
        and logits.shape[0] == samples
    )
    if not fits:
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        what = "the model's output" if plan.output_key is None else f"output[{plan.output_key!r}]"
        dtype = f" and dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""
        raise InvalidModelError(
            f"{what} has shape {found}{dtype}, expected {rank}-D floating-point logits with "
            f"{samples} rows for a batch of {samples} ({plan.task})"
        )
    return _finite(logits)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` when every value is finite, else the error saying so."""
    if not bool(torch.isfinite(logits).all()):
        raise InvalidModelError(
            "the model's output contains NaN or inf; check the input scale and preprocessing"
        )
    return logits


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    labeled: bool,
    plan: TaskPlan = CLASSIFIER,
    ignore_index: int = 255,
    call_fn: CallFn = call_model,
    reference: ReferenceBuffers | None = None,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    min_batch_size: int = 1,
    total_batches: int | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Evaluation:
    """Evaluate ``model`` as it is (its mode is not changed: put it in eval mode first).

    Args:
        model: the model, already on ``device``.
        batches: ``(inputs, labels)`` pairs; labels are ignored unless ``labeled``. Inputs may be
            a tensor or a tuple/dict of tensors (passed through ``call_fn``).
        labeled: compute the labeled metrics (labels must lie in [0, classes); masks may also
            hold ``ignore_index``).
        plan: what to measure (:func:`~worker.evaluation.task.resolve_task`); default a plain
            classifier whose output is the logits.
        ignore_index: segmentation: the mask value left out of every metric.
        call_fn: ``(model, inputs) -> output`` (default: a tensor positionally, a tuple as
            positional arguments, a dict as keyword arguments).
        reference: buffers to compare against (the model before recalibration): each batch also
            runs with them, and ``Evaluation.output_change`` measures how far the outputs moved.
        device: where inputs are moved; default the device of the first parameter (CPU if none).
        autocast_dtype: run forward passes under autocast with this dtype; metrics stay float32.
        channels_last: convert 4-D inputs to channels_last memory format.
        min_batch_size: the fewest samples the model takes per call (a ``torch.export``
            program with a fixed batch size): shorter batches are padded with copies of their
            last sample, whose outputs are discarded (exact in eval mode).
        total_batches: passed to ``progress`` as the total.
        progress: called with ``(batches_done, total_batches)`` after each batch.
        should_stop: polled before each batch; True raises :class:`JobCancelledError`.

    Returns:
        The metrics and the top-1 predictions in batch order.
    """
    device = device or model_device(model)
    accumulator = _accumulator(plan, labeled, ignore_index)
    change = OutputChangeAccumulator() if reference is not None else None
    with torch.inference_mode():
        for done, (inputs, labels) in enumerate(batches, start=1):
            if should_stop is not None and should_stop():
                raise JobCancelledError("the job was cancelled during evaluation")
            x = move_batch(inputs, device, channels_last=channels_last)
            samples = batch_size(x)
            with _autocast(device, autocast_dtype):
                output = run_batch(model, x, min_batch_size, call_fn)
            accumulator.update(checked_logits(plan, output, samples), labels)
            if change is not None and reference is not None:
                with reference.active(model), _autocast(device, autocast_dtype):
                    before = run_batch(model, x, min_batch_size, call_fn)
                change.update(before, output)
            if progress is not None:
                progress(done, total_batches)
    evaluation = accumulator.result()
    if change is not None:
        evaluation.output_change = change.result()
    return evaluation


def max_output_diff(
    reference: nn.Module,
    candidate: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | None = None,
    min_batch_size: int = 1,
    call_fn: CallFn = call_model,
    should_stop: Callable[[], bool] | None = None,
) -> float:
    """Largest ``|candidate(x) − reference(x)|`` over every floating output tensor of all batches
    (float32); ``min_batch_size`` pads short batches as :func:`evaluate` does."""
    device = device or model_device(reference)
    largest = 0.0
    with torch.inference_mode():
        for inputs, _labels in batches:
            if should_stop is not None and should_stop():
                raise JobCancelledError("the job was cancelled while checking the folded model")
            x = move_batch(inputs, device)
            new = leaves(run_batch(candidate, x, min_batch_size, call_fn))
            old = leaves(run_batch(reference, x, min_batch_size, call_fn))
            for a, b in zip(old, new, strict=False):
                if a.is_floating_point() and a.shape == b.shape and a.numel():
                    largest = max(largest, float((b.float() - a.float()).abs().max()))
    return largest


def infer_num_classes(model: nn.Module, inputs: torch.Tensor) -> int:
    """Number of outputs of ``model`` from one forward pass of a small batch (no gradients)."""
    with torch.inference_mode():
        return int(forward_logits(model, inputs.to(model_device(model))).shape[1])
