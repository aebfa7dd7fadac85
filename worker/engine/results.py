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


@dataclass(frozen=True)
class PriorChoice:
    """The prior strength N of Schneider et al. 2020 each layer was mixed with.

    ``strength``: the number asked for, or for ``auto`` the median of the layers' N;
    ``chosen_by``: ``fixed`` (the option's number) or ``auto`` (per layer, from the data: the
    MSE-optimal weight between the source and target estimates); ``per_layer``: N by layer name
    (``auto`` only).
    """

    strength: float
    chosen_by: str
    per_layer: dict[str, float] | None = None


@dataclass(frozen=True)
class Convergence:
    """How much the estimates still moved over the last quarter of the calibration samples.

    ``last_quarter_change``: the largest, over layers, RMS over channels of how far the mean
    estimate moved (in estimated stds) between 3/4 of the samples and the end; small (≲ 0.05)
    means more samples would change little. ``per_layer``: the same by layer name; ``None``
    values where too few batches were seen (fewer than 4) to tell.
    """

    last_quarter_change: float | None
    samples_at_three_quarters: int
    per_layer: dict[str, float]


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
    prior: PriorChoice | None = None
    convergence: Convergence | None = None
