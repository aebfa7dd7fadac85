"""A model with two inputs and a structured output, and its BN oracle, for the multi-input tests.

:class:`TwoView` reads a digit (``x``) and its mirror image (``y``) through two BN branches and
returns a named tuple ``(logits, embedding)``, as a multi-head model would. Its weights come from
the trained digits model (both branches share the trained features' weights, so it classifies
well), the BN statistics of each branch are its own. :func:`pooled_two_view` is the oracle: the
pooled statistics torch's own BN layers see when called ``model(x=..., y=...)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from tests.bn_oracle import Statistics, pooled_statistics
from worker.digits import DigitsNet


class TwoViewOutput(NamedTuple):
    embedding: torch.Tensor
    logits: torch.Tensor


class TwoView(nn.Module):
    """Two DigitsNet feature branches (x and mirrored y), averaged into the digits head."""

    def __init__(self, digits: DigitsNet | None = None, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict  # torch.export cannot save a program returning a named tuple
        digits = digits or DigitsNet()
        self.left = copy.deepcopy(digits.features)
        self.right = copy.deepcopy(digits.features)
        self.head = copy.deepcopy(digits.head)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> TwoViewOutput:
        embedding = 0.5 * (self.left(x) + self.right(torch.flip(y, dims=[3])))
        return TwoViewOutput(embedding, self.head(embedding))

    def as_program(self) -> nn.Module:
        """The same model returning ``{"embedding", "logits"}`` (for ``torch.export``)."""
        model = copy.deepcopy(self)
        model.forward = lambda x, y: TwoView.forward(model, x, y)._asdict()  # type: ignore[method-assign]
        return model


def pooled_two_view(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    order: Sequence[int],
    batch_size: int,
    sizes: Sequence[int] | None = None,
) -> Statistics:
    """Pooled per-channel mean / unbiased variance of every BN layer's input over the batches
    (``batch_size`` each, or the given ``sizes``)."""
    split = list(sizes) if sizes else batch_size
    return pooled_statistics(model, lambda net, idx: net(x=x[idx], y=y[idx]), order, split)
