"""How a run uses the machine: time waiting for batches, data-loading processes, memory retries.

- :class:`TimedBatches` wraps a loader and adds the time spent waiting for each batch to a
  :class:`RunClock`; the rest of a pass is compute (forward passes and their bookkeeping). A run
  whose passes waited longer than they computed is *data-bound* (``report.runtime``).
- :func:`loader_workers`: image archives are decoded by DataLoader processes while the model
  computes (tensor files are sliced in one call: extra processes would only add copies).
- :func:`halve_on_oom`: a pass that runs out of device memory (``torch.OutOfMemoryError``
  anywhere in the exception chain: the pipeline may wrap it) runs again, from its start, with
  half the batch size, down to 2 (or the least the model takes). A pass is pure or restores
  what it changed on failure (the engine puts the original statistics back), so the retry is a
  run at the smaller size; ``population`` statistics do not depend on the batch size.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from recalib.contract import OomRetry, Runtime
from recalib.errors import InvalidModelError
from worker.formats.data import SampleSet
from worker.formats.images import ImageSamples

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RunClock:
    """Seconds the passes of one run took and waited for batches; the memory retries."""

    pass_s: float = 0.0
    wait_s: float = 0.0
    oom_retries: list[OomRetry] = field(default_factory=list)

    def summary(self, *, data_workers: int, pinned_memory: bool) -> Runtime:
        """``report.runtime``: compute is the passes' time not spent waiting for batches."""
        compute_s = max(0.0, self.pass_s - self.wait_s)
        return Runtime(
            data_workers=data_workers,
            pinned_memory=pinned_memory,
            data_wait_s=round(self.wait_s, 4),
            compute_s=round(compute_s, 4),
            data_bound=self.wait_s > compute_s,
            oom_retries=list(self.oom_retries),
        )


class TimedBatches:
    """Iterate ``loader``, adding the time each batch took to arrive to ``clock.wait_s`` and the
    whole pass (from the first request to the end, or until the consumer stopped) to
    ``clock.pass_s``."""

    def __init__(self, loader: Any, clock: RunClock) -> None:
        self.loader, self.clock = loader, clock

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        began = time.perf_counter()
        try:
            batches = iter(self.loader)
            while True:
                start = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    self.clock.wait_s += time.perf_counter() - start
                yield batch
        finally:
            self.clock.pass_s += time.perf_counter() - began


def loader_workers(samples: SampleSet, data_workers: int) -> int:
    """DataLoader processes for ``samples``: ``data_workers`` for image archives, else 0."""
    return data_workers if isinstance(samples, ImageSamples) else 0


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc``, or what it was raised from or during, is a device out-of-memory error."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        if isinstance(current, torch.OutOfMemoryError):
            return True
        seen.append(current)
        current = current.__cause__ or current.__context__
    return False


def halve_on_oom(
    run_pass: Callable[[int], T],
    batch_size: int,
    *,
    step: str,
    clock: RunClock,
    min_size: int = 1,
) -> T:
    """``run_pass(batch_size)``, run again at half the size after each out-of-memory error.

    Raises:
        InvalidModelError: out of memory at the smallest size allowed (2, or ``min_size``).
    """
    size = batch_size
    while True:
        try:
            return run_pass(size)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            half = size // 2
            if half < max(2, min_size):
                raise InvalidModelError(
                    f"out of device memory during {step} at {size} samples per batch, the "
                    f"fewest this model can take here ({max(2, min_size)} is the floor): the "
                    "model needs more memory than the device has; try autocast bf16/fp16 or a "
                    "device with more memory"
                ) from exc
            logger.warning(
                "%s: out of device memory at %d samples per batch; running it again at %d",
                step,
                size,
                half,
            )
            clock.oom_retries.append(OomRetry(step=step, batch_size=size, retried_with=half))
        release_device_memory()  # outside the except block: its traceback held the tensors
        size = half


def release_device_memory() -> None:
    """Free Python garbage and the CUDA caching allocator's unused blocks."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
