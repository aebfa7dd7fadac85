"""Recalibrating an ONNX model: the torch engine's contract, run by ONNX Runtime.

:func:`recalibrate_onnx` feeds the calibration batches through the statistics graph of
:mod:`worker.onnx.graph` (each BN normalizes with its batch's statistics, as train-mode BN in the
torch engine), pools every node's per-batch mean and unbiased variance with the torch engine's
own estimator objects (:mod:`worker.engine.estimators`: ``population``, ``batch_mean``, ``ema``,
prior mixing) and writes the result into a copy of the original model: only BN running
mean/variance initializers change; nodes, names, opset and metadata are the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from recalib.errors import InvalidDataError, JobCancelledError
from worker.engine.estimators import make_estimator, mix_with_prior
from worker.engine.inputs import InputFn, batch_inputs, batch_size
from worker.engine.results import RecalibrationResult
from worker.engine.run_state import estimates_converged, one_value_error, statistics_change
from worker.engine.stream import BatchStream
from worker.onnx.graph import BN_OP, find_bn_nodes, statistics_graph, write_statistics
from worker.onnx.session import (
    batch_size_range,
    feeds,
    graph_inputs,
    make_session,
    run_session,
)

ProgressCallback = Callable[[int, int | None], None]


@dataclass
class OnnxRecalibration:
    """The recalibrated model (a new proto) and what was done, as the torch engine reports it."""

    model: onnx.ModelProto
    result: RecalibrationResult


def recalibrate_onnx(
    model: onnx.ModelProto,
    batches: Iterable[Any],
    *,
    name: str = "model.onnx",
    estimator: str = "population",
    momentum: float = 0.1,
    prior_strength: float = 0.0,
    tolerance: float | None = None,
    tolerance_window: int = 5,
    threads: int | None = None,
    total_batches: int | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    input_fn: InputFn = batch_inputs,
) -> OnnxRecalibration:
    """Re-estimate the running statistics of every BN node of ``model`` on ``batches`` (AdaBN).

    The arguments mean what they mean for :func:`worker.engine.recalibrate` (same estimators,
    same one-sample merging, same early stop); ``name`` names the model in errors, ``threads``
    is ONNX Runtime's intra-op thread count. A graph input with a fixed batch dimension N takes
    batches of exactly N (others are dropped and counted, as for a ``.pt2`` program). ``model``
    itself is not changed.

    Raises:
        NoBatchNormError: no recalibratable BN node (folded: the message says how to keep BN).
        InvalidModelError: a BN inside a subgraph, or a graph ONNX Runtime cannot run.
        InvalidDataError: fewer than 2 samples, a batch the graph does not take, or a BN that
            would see one value per channel.
        JobCancelledError: ``should_stop`` returned True.
    """
    nodes, skipped = find_bn_nodes(model, name)
    rewritten, outputs = statistics_graph(model, nodes, training_bn=True)  # make_session: CPU
    session = make_session(rewritten, name, threads=threads)
    specs = graph_inputs(model)
    min_batch, max_batch = batch_size_range(specs)
    stream = BatchStream(batches, min_size=min_batch, max_size=max_batch, input_fn=input_fn)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    source = [
        (
            torch.from_numpy(onnx.numpy_helper.to_array(initializers[bn.mean.initializer]).copy()),
            torch.from_numpy(onnx.numpy_helper.to_array(initializers[bn.var.initializer]).copy()),
        )
        for bn in nodes
    ]
    estimators = [
        make_estimator(estimator, mean.float(), var.float(), momentum) for mean, var in source
    ]
    output_names = [n for out in outputs for n in (out.mean, out.var, out.size)]
    history: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    samples = batches_run = 0
    stopped_early = False
    for inputs in stream:
        if should_stop is not None and should_stop():
            raise JobCancelledError("job cancelled during recalibration")
        values = run_session(session, output_names, feeds(inputs, specs, name), name)
        size = batch_size(inputs)
        for k, bn in enumerate(nodes):
            mean, var, elements = values[3 * k : 3 * k + 3]
            count = int(elements) // bn.channels
            if count < 2:
                raise one_value_error(bn.name, count, size, max_batch)
            unbiased = torch.from_numpy(np.asarray(var, dtype=np.float64) * (count / (count - 1)))
            estimators[k].update(
                torch.from_numpy(np.asarray(mean)).float(), unbiased.float(), float(count)
            )
        samples += size
        batches_run += 1
        if progress is not None:
            progress(stream.done, total_batches)
        if tolerance is not None:
            history.append([e.result() for e in estimators])
            history = history[-(tolerance_window + 1) :]
            if len(history) > tolerance_window and estimates_converged(
                history[0], history[-1], tolerance
            ):
                stopped_early = True
                break
    if samples < 2:
        dropped = stream.dropped_samples
        detail = f" ({dropped} dropped: outside the batch sizes the model takes)" if dropped else ""
        raise InvalidDataError(
            f"calibration data has fewer than 2 samples{detail}; need at least 2"
        )
    statistics, changes = [], []
    for bn, (old_mean, old_var), estimate in zip(nodes, source, estimators, strict=True):
        target_mean, target_var = estimate.result()
        new_mean = mix_with_prior(old_mean.float(), target_mean, prior_strength, samples)
        new_var = mix_with_prior(old_var.float(), target_var, prior_strength, samples)
        statistics.append((new_mean.numpy(), new_var.numpy()))
        changes.append(
            statistics_change(bn.name, BN_OP, old_mean, old_var, new_mean, new_var, bn.epsilon)
        )
    return OnnxRecalibration(
        model=write_statistics(model, nodes, statistics),
        result=RecalibrationResult(
            layers=[bn.name for bn in nodes],
            skipped=skipped,
            changes=changes,
            samples=samples,
            batches=batches_run,
            merged_batches=stream.merged,
            stopped_early=stopped_early,
            dropped_samples=stream.dropped_samples,
        ),
    )
