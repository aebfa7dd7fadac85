"""A model that runs out of device memory the way a CUDA model does, for the OOM-halving tests.

No GPU is needed: the forward raises the exception type torch raises on a CUDA out-of-memory
(``torch.OutOfMemoryError``), from the middle of the forward (after its first BN ran), whenever
the batch holds more than ``max_batch`` samples. Loaded by the pipeline as a state_dict with
``arch="tests.worker.oom_models:MemoryLimitedDigits"``.
"""

from __future__ import annotations

import torch

from worker.digits import DigitsNet

ARCH = "tests.worker.oom_models:MemoryLimitedDigits"
ALLOWLIST = ("tests.worker.oom_models",)


class MemoryLimitedDigits(DigitsNet):
    """:class:`~worker.digits.DigitsNet` that fits at most ``max_batch`` samples per forward."""

    def __init__(self, max_batch: int, width: int = 16) -> None:
        super().__init__(width=width)
        self.max_batch = max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.features[:2](x)  # the first conv and BN have run
        if x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {x.shape[0]} samples' activations"
            )
        return self.head(self.features[2:](hidden))
