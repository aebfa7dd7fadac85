"""The calibration batch stream: inputs out of each batch, single samples paired with a neighbour.

Train-mode BN cannot normalize a single value per channel, so a one-sample batch is merged with
ONE neighbour: ``[1] + [1]`` becomes a batch of 2, ``[1] + [n]`` or ``[n] + [1]`` one of
``n + 1``; a batch holding a merged single takes no second one, except a lone single at the very
end of the stream, which joins the last batch. With ``batch_size=1`` the stream is therefore
pairs (and one triple for an odd count); no forwarded batch holds more than two samples beyond
the largest input batch, and at most two input batches are read ahead of the one forwarded, so
memory stays bounded and a cancel is seen after a few batches whatever the stream's length.

A model that accepts only some batch sizes (a ``torch.export`` program with a fixed or bounded
batch dimension) sets ``min_size``/``max_size``: no merge exceeds ``max_size`` and a batch outside
``[min_size, max_size]``, or a single that found no neighbour while merging is possible, is
dropped and counted in :attr:`BatchStream.dropped_samples`. With ``max_size == 1`` singles are
forwarded as they are (nothing can be merged).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from worker.engine.inputs import InputFn, Inputs, batch_inputs, batch_size, check_inputs, concat


class BatchStream:
    """Iterate the inputs to forward (see the module docstring for the merge rule).

    ``input_fn`` picks the inputs out of each batch (:func:`worker.engine.inputs.batch_inputs` by
    default); inputs may be a tensor or a tuple/dict of tensors (:mod:`worker.engine.inputs`).

    Counters, valid while and after iterating: ``merged`` (batches joined to a neighbour, one per
    concatenation), ``dropped_samples``, and ``done``: input batches accounted for by the batches
    yielded or dropped so far (for progress; a forwarded batch counts once it is yielded).
    """

    def __init__(
        self,
        batches: Iterable[Any],
        *,
        min_size: int = 1,
        max_size: int | None = None,
        input_fn: InputFn = batch_inputs,
    ) -> None:
        self.input_fn = input_fn
        if min_size < 1 or (max_size is not None and max_size < min_size):
            raise ValueError(f"invalid batch size range [{min_size}, {max_size}]")
        self.batches = batches
        self.min_size, self.max_size = min_size, max_size
        self.merged = self.dropped_samples = self.done = 0

    def _can_merge(self, first: Inputs, second: Inputs) -> bool:
        size = batch_size(first) + batch_size(second)
        return self.max_size is None or size <= self.max_size

    def _emit(self, inputs: Inputs, parts: int) -> Iterator[Inputs]:
        self.done += parts
        size = batch_size(inputs)
        lonely = size == 1 and self.max_size != 1
        outside = size < self.min_size or (self.max_size is not None and size > self.max_size)
        if lonely or outside:  # counted here; the caller says so once (worker.pipeline)
            self.dropped_samples += size
            return
        yield inputs

    def __iter__(self) -> Iterator[Inputs]:
        pending: Inputs | None = None
        parts = 0  # input batches in pending
        absorbed = False  # pending already holds a merged single
        lone: Inputs | None = None  # a single held back: pending may take it at the end
        for batch in self.batches:
            inputs = check_inputs(self.input_fn(batch))
            size = batch_size(inputs)
            if size == 0:
                self.done += 1
                continue
            if lone is not None:  # a batch follows the held single: pending goes out as it is
                yield from self._emit(pending, parts)  # type: ignore[arg-type]
                pending, parts, absorbed, lone = lone, 1, False, None
            if pending is None:
                pending, parts, absorbed = inputs, 1, False
                continue
            single = batch_size(pending) == 1 or size == 1
            if single and self.max_size != 1:
                if absorbed and size == 1:
                    lone = inputs
                    continue
                if self._can_merge(pending, inputs):
                    pending = concat(pending, inputs)
                    parts, absorbed = parts + 1, True
                    self.merged += 1
                    continue
            yield from self._emit(pending, parts)
            pending, parts, absorbed = inputs, 1, False
        if lone is not None:
            if self._can_merge(pending, lone):  # type: ignore[arg-type]
                pending = concat(pending, lone)
                parts += 1
                self.merged += 1
            else:
                yield from self._emit(pending, parts)  # type: ignore[arg-type]
                pending, parts = lone, 1
        if pending is not None:
            yield from self._emit(pending, parts)
