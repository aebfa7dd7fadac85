"""The recalibration engine: re-estimate a model's BN running statistics on target-domain batches.

A plain function over an ``nn.Module`` and an iterable of batches, with no I/O: the CLI, the queue
worker and the tests all call :func:`recalibrate`. The batch stream (single-sample merging, batch
size limits) is :mod:`worker.engine.stream`; the per-run state :mod:`worker.engine.run_state`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from recalib.errors import (
    InvalidDataError,
    InvalidOptionError,
    JobCancelledError,
    NoBatchNormError,
)
from worker.devices import model_device
from worker.engine.bn_layers import BNLayer, find_bn_layers
from worker.engine.estimators import AUTO_PRIOR
from worker.engine.inputs import CallFn, InputFn, batch_inputs, call_model, move_batch
from worker.engine.results import RecalibrationResult
from worker.engine.run_state import CalibrationRun, one_value_error
from worker.engine.stream import BatchStream

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]
"""Called after each forward with (input batches done, input batches in total or None)."""


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    estimator: str = "population",
    momentum: float = 0.1,
    prior_strength: float | str = 0.0,
    tolerance: float | None = None,
    tolerance_window: int = 5,
    device: torch.device | None = None,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    batch_size_range: tuple[int, int | None] = (1, None),
    total_batches: int | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    input_fn: InputFn = batch_inputs,
    call_fn: CallFn = call_model,
) -> RecalibrationResult:
    """Re-estimate the running statistics of every BN layer of ``model`` on ``batches`` (AdaBN).

    Only BN layers run in train mode (only their own ``training`` flag is set: Dropout, DropPath,
    a BN subclass's own ``drop``/``act`` children and the rest stay in eval, unlike
    ``torch.optim.swa_utils.update_bn``, which calls ``model.train()``), under ``no_grad``. Only
    BN buffers change; parameters stay bit-identical. Afterwards every module has its original
    training flag and momentum (a model that arrived in train mode, usually by accident, is put
    wholly in eval mode, with a warning); on an exception or a cancel the original statistics
    are restored too.

    A BN module called several times in one forward (weight sharing) counts every call: the
    ``population`` estimate pools all calls' activations, ``batch_mean`` and ``ema`` count each
    call as one update (as train-mode BN itself would). Where that cannot be measured (a
    TorchScript layer, which takes no hooks) it is refused, never half-counted.

    The model's outputs are never read: any output structure (a tensor, tuples, named tuples,
    dicts, a detector's list of dicts) recalibrates alike.

    Args:
        model: any module with BN layers, eager or TorchScript; modified in place.
        batches: tensors, or tuples/lists whose first item is the input (``(inputs, labels)``),
            or dicts with an ``"inputs"`` key (the default ``input_fn``). Inputs may be one
            tensor or a tuple/dict of tensors (several forward arguments). A batch of one sample
            is merged with one neighbour, since train-mode BN cannot normalize a single value per
            channel (see :mod:`worker.engine.stream`).
        estimator: ``population`` (pooled, element-weighted), ``batch_mean`` (= ``update_bn``)
            or ``ema`` (BN's own rule with ``momentum``, no reset); see
            :mod:`worker.engine.estimators`.
        momentum: EMA momentum, for ``ema`` only.
        prior_strength: N of Schneider et al. 2020; stored stats are N/(N+n)·source +
            n/(N+n)·target with n the samples used. 0 keeps pure target statistics. ``"auto"``
            chooses N per layer from the data: the MSE-optimal weight between the source
            statistics and the target estimate, from the estimate's sampling variance (spread
            of the per-sample statistics) against its squared distance from the source; it
            goes to 0 (full adaptation) as samples grow wherever the target really differs,
            and stays large where the data cannot tell them apart. ``result.prior`` says what
            was chosen.
        tolerance: early stop once, over the last ``tolerance_window`` batches, no channel's
            estimated mean moved by more than ``tolerance`` running stds and no channel's std
            changed by more than that fraction.
        device: where batches go; default the model's device. Pinned, non-blocking on CUDA.
        channels_last: send 4-D batches in channels_last format (convert the model yourself).
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype.
        batch_size_range: the samples per forward the model accepts, ``(min, max or None)``
            (a ``torch.export`` program's batch dimension): no merge exceeds max, and a batch
            outside the range is dropped (counted in ``dropped_samples``). With max 1, batches
            are forwarded one sample each.
        total_batches: input batches in ``batches``, for progress reporting.
        progress: called after each forward with (input batches done, ``total_batches``).
        should_stop: polled before each forward; True raises :class:`JobCancelledError`.
        input_fn: ``batch -> inputs``, the model inputs of one batch (default
            :func:`worker.engine.inputs.batch_inputs`).
        call_fn: ``(model, inputs) -> output``, one forward call (default
            :func:`worker.engine.inputs.call_model`: a tensor positionally, a tuple/list as
            positional arguments, a dict as keyword arguments).

    Returns:
        Which layers were recalibrated or skipped, how their statistics moved, samples used.

    Raises:
        NoBatchNormError: no recalibratable BN layer.
        InvalidDataError: fewer than 2 samples, or a batch train-mode BN cannot normalize.
        InvalidModelError: the model takes one sample per forward and a BN layer then sees one
            value per channel; or a TorchScript BN layer is called more than once per forward,
            or has ``momentum=0`` (refused before any buffer changes).
        StatisticsUnchangedError: no BN layer updated its statistics in train mode (e.g. traced
            TorchScript with ``training=False`` baked into its graph).
        JobCancelledError: ``should_stop`` returned True.

    Example:
        >>> loader = DataLoader(target_dataset, batch_size=64)
        >>> result = recalibrate(model, loader)   # model is now adapted, in eval mode
        >>> recalibrate(model, loader, input_fn=lambda b: b, call_fn=lambda m, b: m(b["x"], b["y"]))
    """
    layers, skipped = find_bn_layers(model)
    if not layers:
        detail = f" ({len(skipped)} skipped: {skipped[0].reason})" if skipped else ""
        raise NoBatchNormError(
            "model has no BatchNorm layers whose statistics can be re-estimated" + detail
        )
    min_batch, max_batch = batch_size_range
    stream = BatchStream(batches, min_size=min_batch, max_size=max_batch, input_fn=input_fn)
    if max_batch == 1:
        logger.warning(
            "the model takes one sample per forward: during calibration each BN layer "
            "normalizes with one sample's statistics, so layers after the first see other "
            "inputs than at inference; a program with a dynamic batch dimension calibrates better"
        )
    device = device or model_device(model)
    if prior_strength != AUTO_PRIOR and (
        isinstance(prior_strength, str) or not prior_strength >= 0
    ):
        raise InvalidOptionError(
            f"prior_strength must be a number >= 0 or {AUTO_PRIOR!r}, got {prior_strength!r}",
            field="prior_strength",
        )
    run = CalibrationRun(
        layers, estimator, momentum, tolerance, tolerance_window, max_batch, call_fn,
        auto_prior=prior_strength == AUTO_PRIOR, total_batches=total_batches,
    )  # fmt: skip
    modes = {module: module.training for module in model.modules()}
    succeeded = False
    try:
        with _bn_train_mode(model, run), torch.no_grad():
            for inputs in stream:
                if should_stop is not None and should_stop():
                    raise JobCancelledError("job cancelled during recalibration")
                inputs = move_batch(inputs, device, channels_last=channels_last)
                run.forward(model, inputs, autocast_dtype)
                if progress is not None:
                    progress(stream.done, total_batches)
                if run.converged():
                    break
        if run.samples < 2:
            dropped = stream.dropped_samples
            detail = (
                f" ({dropped} dropped: outside the batch sizes the model takes)" if dropped else ""
            )
            raise InvalidDataError(
                f"calibration data has fewer than 2 samples{detail}; need at least 2"
            )
        moved = run.finish(prior_strength)
        skipped += moved.skipped
        succeeded = True
    finally:
        _restore_modes(model, modes)
        if not succeeded:
            run.restore()
    return RecalibrationResult(
        layers=[layer.name for layer in moved.layers],
        skipped=skipped,
        changes=moved.changes,
        samples=run.samples,
        batches=run.batches,
        merged_batches=stream.merged,
        stopped_early=run.stopped_early,
        dropped_samples=stream.dropped_samples,
        prior=moved.prior,
        convergence=moved.convergence,
    )


def _restore_modes(model: nn.Module, modes: dict[nn.Module, bool]) -> None:
    """Every module back to its flag; a model that arrived in train mode goes wholly to eval."""
    if modes[model]:
        logger.warning("model was in train mode; it is returned in eval mode for inference")
        model.eval()
        return
    for module, training in modes.items():
        module.train(training)


@contextlib.contextmanager
def _bn_train_mode(model: nn.Module, run: CalibrationRun) -> Iterator[None]:
    """Model in eval, each BN layer's own flag in train (never its children's); eager BN at
    momentum 1 with hooks: one checking the values per channel, one recording every call."""
    model.eval()
    momenta: list[tuple[BNLayer, float | None]] = []
    try:
        for index, layer in enumerate(run.layers):
            layer.module.training = True  # not train(): that would recurse into its children
            if not layer.scripted:
                momenta.append((layer, layer.module.momentum))
                layer.module.momentum = 1.0  # running stats := this call's stats
                layer.hooks.append(layer.module.register_forward_pre_hook(_check_hook(layer, run)))
                layer.hooks.append(layer.module.register_forward_hook(_record_hook(index, run)))
        yield
    finally:
        for layer, value in momenta:
            layer.module.momentum = value
        for layer in run.layers:
            for handle in layer.hooks:
                handle.remove()
            layer.hooks.clear()


def _check_hook(
    layer: BNLayer, run: CalibrationRun
) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        del module
        values = args[0].numel() // layer.channels
        if values < 2:
            raise one_value_error(layer.name, values, int(args[0].shape[0]), run.max_batch)

    return hook


def _record_hook(
    index: int, run: CalibrationRun
) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
    channels = run.layers[index].channels

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        del module, output
        run.record(index, args[0].numel() // channels, args[0])

    return hook
