"""The recalibration engine: a plain function over an ``nn.Module`` and batches, no I/O.

It imports nothing of the REST contract, the job layer or the service (an import-linter contract
keeps it so); its results are the dataclasses of :mod:`worker.engine.results`.
"""

from worker.engine.bn_layers import BNLayer, find_bn_layers
from worker.engine.estimators import ESTIMATORS
from worker.engine.inputs import batch_inputs, call_model, positional_call
from worker.engine.recalibrate import recalibrate
from worker.engine.results import LayerChange, RecalibrationResult, SkippedLayer

__all__ = [
    "ESTIMATORS",
    "BNLayer",
    "LayerChange",
    "RecalibrationResult",
    "SkippedLayer",
    "batch_inputs",
    "call_model",
    "find_bn_layers",
    "positional_call",
    "recalibrate",
]
