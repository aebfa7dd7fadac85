"""What the engine returns: plain dataclasses, independent of the REST contract.

:mod:`worker.report` turns them into the report's pydantic models; the engine never imports those.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SkippedLayer:
    """A BN layer left alone, and why."""

    name: str
    type: str
    reason: str


@dataclass(frozen=True)
class LayerChange:
    """How one BN layer's running statistics moved.

    ``mean_shift_std``: RMS over channels of (new mean − old mean) / old running std.
    ``var_ratio``: geometric mean over channels of new var / old var.
    """

    name: str
    type: str
    channels: int
    mean_shift_std: float
    var_ratio: float


@dataclass
class RecalibrationResult:
    """What :func:`worker.engine.recalibrate` did.

    ``samples`` counts calibration samples actually forwarded; ``merged_batches`` the one-sample
    batches that were joined to a neighbour, one per join (train-mode BN needs two values per
    channel); ``dropped_samples`` those left out because the model cannot take their batch (a
    remainder shorter than a fixed batch size, or a single sample no neighbour could take).
    """

    layers: list[str]
    skipped: list[SkippedLayer]
    changes: list[LayerChange]
    samples: int
    batches: int
    merged_batches: int
    stopped_early: bool
    dropped_samples: int = 0
