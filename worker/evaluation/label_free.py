"""Label-free measures for any output: how far the outputs moved through recalibration.

Recalibration changes buffers only (parameters stay bit-identical), so the model *before* is the
same module with its old buffers. :class:`ReferenceBuffers` keeps those and runs one batch with
them in place (restored in ``finally``), which gives the before-output of every evaluated sample
without a second copy of the model or storing any output. :class:`OutputChangeAccumulator` sums
‖after − before‖² and ‖before‖² over every floating output tensor whose shape did not change
(relative L2 change); tensors whose shape changed (a detector now finding another number of
boxes) are counted apart.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from recalib.contract import OutputChange
from worker.evaluation.outputs import float_leaves


class ReferenceBuffers:
    """A snapshot of a model's buffers (its BN statistics before recalibration)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = {name: value.detach().clone() for name, value in model.named_buffers()}

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``model`` has the snapshot's buffers; its own are put back after."""
        buffers = dict(model.named_buffers())
        current = {name: buffers[name].detach().clone() for name in self.saved if name in buffers}
        try:
            with torch.no_grad():
                for name in current:
                    buffers[name].copy_(self.saved[name])
            yield
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    buffers[name].copy_(value)


class OutputChangeAccumulator:
    """Sums of squared output differences, batch by batch."""

    def __init__(self) -> None:
        self._diff = self._norm = 0.0
        self.tensors = self.shape_changed = 0

    def update(self, before: Any, after: Any) -> None:
        """Compare one batch's outputs (same structure, tensors in the same order)."""
        old, new = float_leaves(before), float_leaves(after)
        if len(old) != len(new):
            self.shape_changed += max(len(old), len(new))
            return
        for a, b in zip(old, new, strict=True):
            if a.shape != b.shape:
                self.shape_changed += 1
                continue
            self.tensors += 1
            a64, b64 = a.detach().double(), b.detach().double()
            self._diff += float((b64 - a64).square().sum())
            self._norm += float(a64.square().sum())

    def result(self) -> OutputChange:
        relative: float | None = None
        if self.tensors:
            if self._norm > 0:
                relative = math.sqrt(self._diff / self._norm)
            else:
                relative = 0.0 if self._diff == 0 else math.inf
        if relative is not None and not math.isfinite(relative):
            relative = None
        return OutputChange(
            relative_l2=relative, tensors=self.tensors, shape_changed=self.shape_changed
        )
