"""Which evaluation a job gets: classification, segmentation or label-free (``none``).

:func:`resolve_task` looks at one probe output of the model and at the labels of the evaluation
data. ``output_key`` (or, without it, :func:`~worker.evaluation.outputs.auto_logits`) picks the
logits out of a structured output. ``auto`` then decides:

- masks (N×H×W labels) → segmentation; (N, C, H, W) logits needed;
- class ids (N labels) → classification; (N, C) logits needed;
- no labels → classification for (N, C) logits, segmentation for (N, C, H, W), else ``none``.

An explicit task must fit the output and labels, or it is an error naming what does not fit. The
decision, the logits' key and the reason go into ``report.task``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from recalib.errors import InvalidDataError, InvalidModelError, InvalidOptionError
from worker.evaluation.outputs import auto_logits, describe, keys, select

LabelKind = Literal["class", "mask"] | None
_RANK = {"classification": 2, "segmentation": 4}
_SHAPE = {"classification": "(batch, classes)", "segmentation": "(batch, classes, H, W)"}


@dataclass(frozen=True)
class TaskPlan:
    """The evaluation decided for a job (see the module docstring)."""

    task: Literal["classification", "segmentation", "none"]
    requested: Literal["auto", "classification", "segmentation", "none"]
    output_key: str | None
    has_logits: bool
    num_classes: int | None
    output: str
    reason: str
    output_rank: int | None = None  # of the logits: 2 (N, C) or 4 (N, C, H, W)

    def logits(self, output: Any) -> torch.Tensor | None:
        """The logits of one batch's output (None when this plan has none)."""
        if not self.has_logits:
            return None
        return output if self.output_key is None else select(output, self.output_key)


def resolve_task(
    output: Any, *, requested: str, output_key: str | None, labels: LabelKind, batch: int
) -> TaskPlan:
    """Decide the evaluation from a probe ``output`` of ``batch`` samples (module docstring).

    Raises:
        InvalidOptionError: ``output_key`` does not exist (naming the keys that do).
        InvalidModelError: no logits of the shape the task needs.
        InvalidDataError: labels of the wrong kind for the requested task.
    """
    shape = describe(output)
    if output_key is not None:
        candidate, key = select(output, output_key), output_key
        if not isinstance(candidate, torch.Tensor):
            raise InvalidOptionError(
                f"output_key {output_key!r} selects {describe(candidate)}, not a tensor of logits; "
                f"the output is {shape}",
                field="options.output_key",
            )
    else:
        candidate, key = auto_logits(output)
    where = "the output" if key is None else f"output[{key!r}]"
    rank = _rank(candidate, batch)

    def plan(task: Any, has_logits: bool, reason: str) -> TaskPlan:
        classes = int(candidate.shape[1]) if has_logits and candidate is not None else None
        return TaskPlan(
            task,
            requested,  # type: ignore[arg-type]
            key if has_logits else None,
            has_logits,
            classes,
            shape,
            reason,
            rank if has_logits else None,
        )

    if requested == "none":
        return plan("none", rank in (2, 4), "requested")
    if requested in _RANK:
        _check_labels_fit(requested, labels)
        if rank != _RANK[requested]:
            raise _no_logits(requested, output, candidate, where, batch)
        return plan(requested, True, "requested")
    if labels == "mask":
        if rank != 4:
            raise _no_logits(
                "segmentation", output, candidate, where, batch, "the labels are masks"
            )
        return plan("segmentation", True, f"auto: the labels are masks, {where} is N×C×H×W")
    if labels == "class":
        if rank != 2:
            raise _no_logits(
                "classification", output, candidate, where, batch, "the labels are class ids"
            )
        return plan("classification", True, f"auto: the labels are class ids, {where} is N×C")
    if rank == 2:
        return plan("classification", True, f"auto: no labels, {where} is N×C logits")
    if rank == 4:
        return plan("segmentation", True, f"auto: no labels, {where} is N×C×H×W logits")
    return plan("none", False, f"auto: no labels and no N×C or N×C×H×W logits in {shape}")


def _rank(candidate: Any, batch: int) -> int | None:
    """The rank of a usable logits tensor (floating, one row per sample), else None."""
    if not isinstance(candidate, torch.Tensor) or not candidate.is_floating_point():
        return None
    if candidate.dim() < 2 or candidate.shape[0] != batch:
        return None
    return candidate.dim()


def _check_labels_fit(task: str, labels: LabelKind) -> None:
    if task == "classification" and labels == "mask":
        raise InvalidDataError(
            "task classification needs one class id per sample, but the labels are N×H×W "
            "masks; use task segmentation (or auto)"
        )
    if task == "segmentation" and labels == "class":
        raise InvalidDataError(
            "task segmentation needs N×H×W masks as labels, but the labels are one class id per "
            "sample; use task classification (or auto)"
        )


def _no_logits(
    task: str, output: Any, candidate: Any, where: str, batch: int, why: str = ""
) -> InvalidModelError:
    reason = f" ({why})" if why else ""
    expected = _SHAPE[task]
    if isinstance(candidate, torch.Tensor):
        found = (
            f"{where} has shape {tuple(candidate.shape)} and dtype {candidate.dtype}, expected "
            f"{expected} floating-point logits for a batch of {batch}"
        )
    else:
        available = keys(output)
        hint = f" (keys: {available})" if available else ""
        found = (
            f"the model returned {type(output).__name__} {describe(output)}, and no logits were "
            f"found in it; set output_key to where the {expected} logits are{hint}"
        )
    return InvalidModelError(f"{task}{reason}: {found}; or set task none for label-free evaluation")
