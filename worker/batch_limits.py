"""The input sizes a loaded model accepts, and the checks that the data fits them.

Only ``.pt2`` programs constrain their input: exported without ``dynamic_shapes`` every dimension
is fixed, the batch dimension too, and the program asserts it on every call ("Guard failed:
x.size()[0] == 2"). Such shape guards are the input's problem, never an internal error:

- a fixed or bounded batch size is honoured: evaluation runs in batches the program takes (a short
  last batch padded, exact in eval mode) and calibration too (a short remainder dropped, so
  ``calibration.samples`` < ``available_samples``, and logged);
- a fixed non-batch dimension the data does not match is an :class:`InvalidDataError` naming
  the dimension, both sizes and the fix (re-export with ``dynamic_shapes``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recalib.errors import InvalidDataError
from worker.engine.inputs import first_tensor
from worker.formats.data import SampleSet
from worker.formats.export_program import ProgramInput, program_input
from worker.formats.models import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    """Samples per call the model takes (``max_size`` None: no bound), and the program's input."""

    min_size: int = 1
    max_size: int | None = None
    program: ProgramInput | None = None
    model_name: str = "the model"

    def fit(self, requested: int, purpose: str | None = None) -> int:
        """``requested`` clamped into the accepted range (logged, with ``purpose``, if changed)."""
        size = max(requested, self.min_size)
        if self.max_size is not None:
            size = min(size, self.max_size)
        if size != requested and purpose is not None:
            logger.warning(
                "%s: %s in batches of %d instead of %d: the exported program takes %s samples "
                "per call",
                self.model_name,
                purpose,
                size,
                requested,
                self.describe_batch(),
            )
        return size

    def describe_batch(self) -> str:
        if self.max_size == self.min_size:
            return f"exactly {self.min_size}"
        return f"{self.min_size} to {self.max_size or 'any number of'}"

    def check_samples(self, probe: Any, samples: SampleSet) -> None:
        """Raise :class:`InvalidDataError` if ``probe`` (a batch of ``samples``) does not fit a
        fixed non-batch dimension or the rank of the program's input (its first input, when
        there are several)."""
        if self.program is None:
            return
        expected, shape = self.program.shape, tuple(first_tensor(probe).shape)
        data = f"the samples of shape {shape[1:]} from {Path(samples.path).name}"
        program = f"{self.model_name} was exported for inputs of shape {self.program.describe()}"
        fix = "export the model with torch.export dynamic_shapes making that dimension dynamic"
        if len(shape) != len(expected):
            raise InvalidDataError(
                f"{data} do not fit the model: {program} (rank {len(expected)}, the batches "
                f"have rank {len(shape)}); convert the data to that shape",
                file=str(samples.path),
            )
        for dim, (want, have) in enumerate(zip(expected, shape, strict=True)):
            if dim == 0 or want is None or want == have:
                continue
            raise InvalidDataError(
                f"{data} do not fit the model: {program}, which fixes dimension {dim} to "
                f"{want} (the samples have {have}); convert the data to that size, or {fix}",
                file=str(samples.path),
            )


def batch_limits(loaded: LoadedModel) -> BatchLimits:
    """The limits of ``loaded``: those of a ``.pt2`` program's first input, or an ONNX graph's
    fixed batch dimension, else none."""
    if loaded.format == "onnx":
        from worker.onnx.session import batch_size_range

        low, high = batch_size_range(loaded.module.inputs)  # type: ignore[arg-type]
        return BatchLimits(low, high, None, loaded.source_path.name)
    if loaded.program is None:
        return BatchLimits(model_name=loaded.source_path.name)
    spec = program_input(loaded.program)
    if spec is None:
        return BatchLimits(model_name=loaded.source_path.name)
    limits = BatchLimits(spec.batch_min, spec.batch_max, spec, loaded.source_path.name)
    if spec.batch_max is not None or spec.batch_min > 1:
        logger.info(
            "%s takes inputs of shape %s, %s samples per call",
            limits.model_name,
            spec.describe(),
            limits.describe_batch(),
        )
    return limits


def probe_indices(indices: Sequence[int], size: int) -> list[int]:
    """``size`` sample indices from ``indices``, repeated when there are fewer (eval-mode probe)."""
    return [int(indices[i % len(indices)]) for i in range(size)]


@contextlib.contextmanager
def shape_guards_as_data_errors(limits: BatchLimits) -> Iterator[None]:
    """Turn a ``.pt2`` shape guard failure (an AssertionError) into an InvalidDataError."""
    try:
        yield
    except AssertionError as exc:
        message = str(exc).strip()
        if limits.program is None or not message.startswith("Guard failed"):
            raise
        raise InvalidDataError(
            f"{limits.model_name} refused a batch ({message}): it was exported for inputs of "
            f"shape {limits.program.describe()}; feed data of that shape, or export it with "
            "torch.export dynamic_shapes"
        ) from exc
