"""Before any evaluation or recalibration: load the job's files and check they fit together.

:func:`load_job` opens the model and the data (arrays named by ``options.input_names``) and plans
the split; :func:`check_job` fails on bad input before the first evaluation pass: no BN layer,
input names the model's forward does not take, data the model cannot run on, an ``output_key``
that does not exist, logits that do not fit the task, labels (class ids or mask values) outside
the model's classes. It returns the :class:`~worker.evaluation.TaskPlan` the job evaluates with.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from recalib.contract import JobOptions, JobSpec
from recalib.errors import (
    InternalError,
    InvalidDataError,
    InvalidOptionError,
    NoBatchNormError,
    NotFoundError,
    RecalibError,
)
from worker.batch_limits import BatchLimits, probe_indices
from worker.devices import model_device
from worker.engine import find_bn_layers
from worker.engine.inputs import CallFn, batch_size, move_batch
from worker.evaluation import TaskPlan, resolve_task, run_batch
from worker.evaluation.segmentation import fit_to_masks
from worker.formats.data import DataLimits, SampleSet, check_labels, check_masks, open_samples
from worker.formats.models import LoadedModel, read_model
from worker.splits import DataPlan, plan_data

MAX_CAUSE_CHARS = 2000
"""Characters of a model's own error message kept in the preflight error (its every line)."""


def load_job(spec: JobSpec) -> tuple[LoadedModel, DataPlan]:
    """The model and the data plan of ``spec``; files missing are a :class:`NotFoundError`."""
    for path, field in (
        (spec.model_path, "model_path"),
        (spec.calibration_path, "calibration_path"),
        (spec.eval_path, "eval_path"),
        (spec.source_eval_path, "source_eval_path"),
    ):
        if path is not None and not Path(path).is_file():
            raise NotFoundError(f"{field}: no such file: {path}", file=path)
    loaded = read_model(
        spec.model_path,
        arch=spec.arch,
        arch_kwargs=spec.arch_kwargs,
        allow_unsafe_pickle=spec.allow_unsafe_pickle,
        arch_allowlist=tuple(spec.arch_allowlist),
    )
    limits = DataLimits(
        max_archive_members=spec.max_archive_members,
        max_archive_bytes=spec.max_archive_bytes,
        max_image_pixels=spec.max_image_pixels,
    )
    options = spec.options
    names = tuple(options.input_names)
    calibration = open_samples(
        spec.calibration_path, preprocess=options.preprocess, limits=limits, input_names=names
    )
    eval_set = None
    if spec.eval_path is not None:
        eval_set = open_samples(
            spec.eval_path, preprocess=options.preprocess, limits=limits, input_names=names
        )
    return loaded, plan_data(calibration, eval_set, options)


def load_source_eval(spec: JobSpec) -> SampleSet | None:
    """The labeled source validation set of ``spec`` (None without one).

    Raises:
        InvalidDataError: it has no labels.
    """
    if spec.source_eval_path is None:
        return None
    limits = DataLimits(
        max_archive_members=spec.max_archive_members,
        max_archive_bytes=spec.max_archive_bytes,
        max_image_pixels=spec.max_image_pixels,
    )
    options = spec.options
    samples = open_samples(
        spec.source_eval_path,
        preprocess=options.preprocess,
        limits=limits,
        input_names=tuple(options.input_names),
    )
    if not samples.has_labels or samples.num_samples == 0:
        raise InvalidDataError(
            "the source evaluation set needs labeled samples (its labels are what the "
            "label-free estimate learns from); give one with labels",
            file=spec.source_eval_path,
        )
    return samples


def check_job(
    model: torch.nn.Module,
    loaded: LoadedModel,
    plan: DataPlan,
    limits: BatchLimits,
    options: JobOptions,
    call_fn: CallFn,
) -> TaskPlan:
    """Fail before any evaluation (see the module docstring); return the evaluation's plan."""
    if loaded.format == "onnx":
        _check_onnx(loaded, options.input_names)
    else:
        layers, skipped = find_bn_layers(model)
        if not layers:
            detail = f" ({len(skipped)} skipped: {skipped[0].reason})" if skipped else ""
            raise NoBatchNormError(
                "model has no BatchNorm layers whose statistics can be re-estimated" + detail
            )
        check_input_names(model, loaded, options.input_names)
    data_sets = [(plan.calibration, plan.calibration_indices)]
    if plan.eval_set is not plan.calibration:
        data_sets.append((plan.eval_set, plan.eval_indices))
    task: TaskPlan | None = None
    for samples, indices in data_sets:
        if not indices:
            raise InvalidDataError("the data file holds no samples", file=str(samples.path))
        probe = samples.get_batch(probe_indices(indices, limits.fit(2)))[0]
        limits.check_samples(probe, samples)
        output = _probe(model, probe, samples, call_fn, options)
        if samples is plan.eval_set:
            task = resolve_task(
                output,
                requested=options.task.value,
                output_key=options.output_key,
                labels=samples.label_kind if plan.labeled else None,
                batch=batch_size(probe),
            )
            _check_logit_size(task, output, samples)
    if task is None:  # the eval set is always one of the data sets
        raise InternalError("no evaluation data set was probed")
    for samples, _ in data_sets:
        _check_labels(task, samples, options.ignore_index)
    return task


def _probe(
    model: torch.nn.Module, probe: Any, samples: SampleSet, call_fn: CallFn, options: JobOptions
) -> Any:
    """The model's output on ``probe`` (eval mode, no gradients); failures name the data."""
    shape = tuple(probe.shape[1:]) if isinstance(probe, torch.Tensor) else _shapes(probe)
    try:
        with torch.inference_mode():
            return run_batch(model, move_batch(probe, model_device(model)), 1, call_fn)
    except RecalibError:
        raise
    except Exception as exc:  # the model is user code: any failure here is a bad input
        hint = ""
        if isinstance(exc, TypeError) and "argument" in str(exc):
            hint = f" (input_names {list(options.input_names)} must match its forward arguments)"
        raise InvalidDataError(
            f"the model fails on samples of shape {shape} from {Path(samples.path).name}: "
            f"{_bounded(str(exc) or type(exc).__name__)}{hint}",
            file=str(samples.path),
        ) from exc


def _bounded(cause: str) -> str:
    if len(cause) <= MAX_CAUSE_CHARS:
        return cause
    return f"{cause[:MAX_CAUSE_CHARS]}… ({len(cause) - MAX_CAUSE_CHARS} more characters)"


def _shapes(probe: Any) -> str:
    if isinstance(probe, dict):
        return ", ".join(f"{k}: {tuple(v.shape[1:])}" for k, v in probe.items())
    return type(probe).__name__


def check_input_names(model: torch.nn.Module, loaded: LoadedModel, names: list[str]) -> None:
    """The inputs must fit the forward: a ``.pt2`` program takes as many as ``input_names`` lists,
    in order; another model given several must have an argument of each name (or ``**kwargs``).

    Raises:
        InvalidOptionError: naming ``options.input_names`` and the forward's arguments.
    """
    if loaded.program is not None:
        expected = list(loaded.program.graph_signature.user_inputs)
        if len(expected) != len(names):
            raise InvalidOptionError(
                f"{loaded.source_path.name} takes {len(expected)} inputs {expected} (in this "
                f"order), and input_names lists {len(names)}: {names}",
                field="options.input_names",
            )
        return
    if len(names) < 2:
        return  # one input is passed positionally, whatever its name
    arguments = _forward_arguments(model)
    if arguments is None:
        return
    missing = [name for name in names if name not in arguments]
    if missing:
        raise InvalidOptionError(
            f"{missing} of input_names {names} are not arguments of the model's "
            f"forward({', '.join(arguments)}); several inputs are passed by name",
            field="options.input_names",
        )


def _check_onnx(loaded: LoadedModel, names: list[str]) -> None:
    """An ONNX model has a recalibratable BN node (else ``no-batchnorm``, with the export advice)
    and, given several ``input_names``, takes exactly those graph inputs."""
    from worker.onnx.graph import find_bn_nodes

    module = loaded.module
    find_bn_nodes(module.proto, loaded.source_path.name)  # type: ignore[arg-type]
    expected = [spec.name for spec in module.inputs]  # type: ignore[union-attr]
    if len(names) >= 2 and sorted(names) != sorted(expected):
        raise InvalidOptionError(
            f"{loaded.source_path.name} takes the graph inputs {expected}, and input_names lists "
            f"{names}: name the data's arrays as the graph's inputs",
            field="options.input_names",
        )


def _forward_arguments(model: torch.nn.Module) -> list[str] | None:
    """The forward's argument names; None when it takes ``**kwargs`` or cannot be read."""
    if isinstance(model, torch.jit.ScriptModule):
        try:
            return [a.name for a in model.forward.schema.arguments][1:]  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            return None
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _check_logit_size(task: TaskPlan, output: Any, samples: SampleSet) -> None:
    """Segmentation logits larger than the masks cannot be scored (smaller are upsampled)."""
    if task.task != "segmentation" or samples.label_kind != "mask":
        return
    logits = task.logits(output)
    try:
        fit_to_masks(logits, samples.label_shape)  # type: ignore[arg-type]
    except InvalidDataError as exc:
        raise InvalidDataError(
            f"{Path(samples.path).name}: {exc.message}", file=str(samples.path)
        ) from exc


def _check_labels(task: TaskPlan, samples: SampleSet, ignore_index: int) -> None:
    """Labels of the kind the task scores must lie within the model's classes."""
    if task.num_classes is None:
        return
    if task.task == "classification" and samples.label_kind == "class":
        check_labels(samples, task.num_classes)
    elif task.task == "segmentation" and samples.label_kind == "mask":
        check_masks(samples, task.num_classes, ignore_index)
