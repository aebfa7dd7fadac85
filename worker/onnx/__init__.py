"""ONNX models: read a tenant's ``.onnx`` file safely, recalibrate its BN nodes with ONNX Runtime.

Needs the ``onnx`` extra (``onnx``, ``onnxruntime``). :func:`read_onnx` loads and checks a file
(:mod:`worker.onnx.load`), :func:`recalibrate_onnx` re-estimates its BN statistics with the torch
engine's estimators (:mod:`worker.onnx.recalibrate`).
"""

from worker.onnx.load import read_onnx
from worker.onnx.recalibrate import OnnxRecalibration, recalibrate_onnx

__all__ = ["OnnxRecalibration", "read_onnx", "recalibrate_onnx"]
