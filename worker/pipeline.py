"""The job runner: one recalibration from files to ``report.json`` and checkpoints.

:func:`run_job` is what the queue worker and ``recalib run`` execute. Phases, in order (each
reported through ``on_progress`` as :class:`~recalib.contract.Progress`, ``done``/``total`` in
batches): ``loading`` → ``evaluating`` (original statistics) → ``recalibrating`` → ``evaluating``
(new statistics) → ``saving`` (checkpoint, then the folded copy when ``options.fold``).

Which samples calibrate and which evaluate: :mod:`worker.splits` (recorded in ``report.data``).
Batch sizes a ``.pt2`` program fixes or bounds are honoured: :mod:`worker.batch_limits`. Bad
input is refused before the first pass (:mod:`worker.preflight`), which also decides what the
evaluation measures (``options.task``: :mod:`worker.evaluation.task`). Several inputs reach the
model by keyword, a ``.pt2`` program's positionally in ``input_names`` order. Without labels (or
with task ``none``) the after-pass also measures how far every output moved
(``report.output_change``).

A drift job (``spec.kind == "drift"``) loads and checks the same way, then runs one eval-mode
pass over the calibration data (:func:`worker.engine.drift.measure_drift`, phase ``evaluating``)
and writes only ``report.json``/``report.html`` with ``report.drift``: no evaluation, no
checkpoint, the model unchanged. It reads the calibration file only (an eval file is ignored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recalib.contract import ExportReport, FoldReport, JobKind, JobSpec, Phase, Progress, Report
from recalib.errors import InvalidOptionError, JobCancelledError
from worker import report as reporting
from worker.batch_limits import batch_limits, probe_indices, shape_guards_as_data_errors
from worker.devices import resolve_device
from worker.engine import RecalibrationResult, call_model, positional_call, recalibrate
from worker.engine.drift import DriftResult, measure_drift
from worker.evaluation import Evaluation, ReferenceBuffers, evaluate, max_output_diff
from worker.fold_export import save_folded
from worker.folding import fold_batchnorm
from worker.formats.data import SampleSet, make_loader
from worker.formats.models import artifact
from worker.preflight import check_job, load_job, load_source_eval
from worker.runtime import RunClock, TimedBatches, halve_on_oom, loader_workers

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Reporter:
    """Turns phase changes and per-batch callbacks into :class:`Progress` events."""

    def __init__(
        self,
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.on_progress = on_progress
        self.should_stop = should_stop

    def start(self, phase: Phase, total: int | None = None) -> None:
        if self.should_stop is not None and self.should_stop():
            raise JobCancelledError(f"the job was cancelled before the {phase.value} phase")
        self.emit(phase, 0, total)

    def emit(self, phase: Phase, done: int, total: int | None) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(phase=phase, done=done, total=total))

    def batches(self, phase: Phase) -> Callable[[int, int | None], None]:
        return lambda done, total: self.emit(phase, done, total)


def run_job(
    spec: JobSpec,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_workers: int = 0,
) -> Report:
    """Recalibrate ``spec.model_path`` on ``spec.calibration_path`` and evaluate before/after.

    Writes into ``spec.out_dir``: ``report.json`` (the returned :class:`Report`), the recalibrated
    checkpoint (same format as the input) and, with ``options.fold``, the BN-folded copy.

    Args:
        spec: paths, options and the operator's limits.
        on_progress: called at each phase start and after each batch (never more often).
        should_stop: polled between batches; True raises :class:`JobCancelledError`.
        data_workers: DataLoader processes decoding image archives (:mod:`worker.runtime`).

    Raises:
        UserError: a subclass naming the file or option at fault, for any bad input.
        JobCancelledError: ``should_stop`` returned True.
    """
    if spec.kind == JobKind.drift:
        spec = spec.model_copy(update={"eval_path": None})  # a drift check reads one file
    return _Job(spec, on_progress, should_stop, data_workers).run()


class _Job:
    """One run of :func:`run_job`: the phases as methods sharing the loaded model and data."""

    def __init__(
        self,
        spec: JobSpec,
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        data_workers: int = 0,
    ) -> None:
        self.spec, self.options = spec, spec.options
        self.data_workers, self.clock = data_workers, RunClock()
        self.should_stop = should_stop
        self.progress = _Reporter(on_progress, should_stop)
        self.timer = reporting.Timer()
        self.out_dir = Path(spec.out_dir)
        self.autocast_dtype = AUTOCAST_DTYPES[self.options.autocast]

    def run(self) -> Report:
        self.progress.start(Phase.loading)
        with self.timer("load"):
            self.loaded, self.plan = load_job(self.spec)
            self.device = resolve_device(self.options.device)
            self.model = self.loaded.module.to(self.device)
            if self.options.channels_last:  # Module.to takes memory_format; the stubs lack it
                self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self.limits = batch_limits(self.loaded)
            self.call_fn = positional_call if self.loaded.program is not None else call_model
            self.task = check_job(
                self.model, self.loaded, self.plan, self.limits, self.options, self.call_fn
            )
            if self.options.prior_strength == "auto" and self.loaded.format == "onnx":
                raise InvalidOptionError(
                    "prior_strength auto is not available for ONNX models yet: give a number",
                    field="options.prior_strength",
                )
            if self.options.export and self.loaded.format == "onnx":
                raise InvalidOptionError(
                    "export is for torch models, and this model is ONNX already: drop export",
                    field="options.export",
                )
            if self.spec.kind == JobKind.drift and self.loaded.format == "onnx":
                raise InvalidOptionError(
                    "a drift check is not available for ONNX models yet: run a recalibration "
                    "job instead (report.layers gives how far each BN layer's statistics moved)",
                    field="kind",
                )
        if self.spec.kind == JobKind.drift:
            return self._drift_check()
        logger.info("evaluating as %s (%s)", self.task.task, self.task.reason)
        self.eval_batch_size = self.limits.fit(self.options.eval_batch_size, "evaluating")
        self.eval_loader = self._loader(
            self.plan.eval_set, self.plan.eval_indices, self.eval_batch_size
        )
        before = self._evaluate_halving("evaluate_before")
        source = self._evaluate_source()
        label_free = self.task.task == "none" or not self.plan.labeled
        reference = ReferenceBuffers(self.model) if label_free else None
        batch_size = self.limits.fit(self.options.batch_size, "calibrating")
        result = halve_on_oom(
            self._recalibrate, batch_size, step="recalibrate", clock=self.clock,
            min_size=self.limits.min_size,
        )  # fmt: skip
        after = self._evaluate_halving("evaluate_after", reference)

        self.progress.start(Phase.saving)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.timer("save"):
            # safetensors and torch.export want contiguous tensors
            self.model.to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]
            checkpoint = self.loaded.save(self.out_dir)
        folded = None
        if self.options.fold:
            with self.timer("fold"):
                folded = self._fold()
        report = reporting.build_report(
            self.spec,
            loaded=self.loaded,
            plan=self.plan,
            result=result,
            before=before,
            after=after,
            checkpoint=checkpoint,
            folded=folded,
            device=self.device,
            timings_s=self.timer.finish(),
            task=self.task,
            source=source,
        )
        if "onnx" in self.options.export:
            with self.timer("export_onnx"):
                export = self._export_onnx()
            update = {"exports": [export], "timings_s": self.timer.finish()}
            report = report.model_copy(update=update)
        runtime = self.clock.summary(
            data_workers=loader_workers(self.plan.calibration, self.data_workers),
            pinned_memory=self.device.type == "cuda",
        )
        update: dict[str, object] = {"runtime": runtime}
        if self.loaded.format == "onnx":  # which runtime ran the passes, not only the device
            from worker.onnx.session import CPU_PROVIDER

            update["device"] = f"{report.device}, ONNX Runtime {CPU_PROVIDER}"
        report = report.model_copy(update=update)
        reporting.write_report(report, self.out_dir)
        return report  # options.register: the trusted side registers it (worker.runner.sandboxed)

    def _drift_check(self) -> Report:
        """The drift job: one eval-mode pass over the calibration data, ``report.drift``."""
        indices = list(range(self.plan.calibration.num_samples))
        if self.options.max_samples is not None and self.options.max_samples < len(indices):
            order = np.random.default_rng(self.options.seed).permutation(len(indices))
            indices = sorted(int(i) for i in order[: self.options.max_samples])
        batch_size = self.limits.fit(self.options.eval_batch_size, "evaluating")

        def at(size: int) -> DriftResult:
            loader = self._loader(self.plan.calibration, indices, size)
            self.progress.start(Phase.evaluating, len(loader))
            with self.timer("drift"), shape_guards_as_data_errors(self.limits):
                return measure_drift(
                    self.model,
                    loader,
                    device=self.device,
                    channels_last=self.options.channels_last,
                    autocast_dtype=self.autocast_dtype,
                    batch_size_range=(self.limits.min_size, self.limits.max_size),
                    call_fn=self.call_fn,
                    total_batches=len(loader),
                    progress=self.progress.batches(Phase.evaluating),
                    should_stop=self.should_stop,
                )

        result = halve_on_oom(
            at, batch_size, step="drift", clock=self.clock, min_size=self.limits.min_size
        )
        self.progress.start(Phase.saving)
        report = reporting.build_drift_report(
            self.spec,
            loaded=self.loaded,
            plan=self.plan,
            indices=indices,
            result=result,
            device=self.device,
            timings_s=self.timer.finish(),
        )
        runtime = self.clock.summary(
            data_workers=loader_workers(self.plan.calibration, self.data_workers),
            pinned_memory=self.device.type == "cuda",
        )
        report = report.model_copy(update={"runtime": runtime})
        reporting.write_report(report, self.out_dir)
        return report

    def _loader(self, samples: SampleSet, indices: list[int], batch_size: int) -> TimedBatches:
        pin_memory = self.device.type == "cuda"
        workers = loader_workers(samples, self.data_workers)
        return TimedBatches(
            make_loader(
                samples, indices=indices, batch_size=batch_size, pin_memory=pin_memory,
                num_workers=workers,
            ),
            self.clock,
        )  # fmt: skip

    def _evaluate_halving(self, step: str, reference: ReferenceBuffers | None = None) -> Evaluation:
        """:meth:`_evaluate`, run again with half the batch size after out-of-memory errors."""

        def at(batch_size: int) -> Evaluation:
            if batch_size != self.eval_batch_size:
                self.eval_batch_size = batch_size
                self.eval_loader = self._loader(
                    self.plan.eval_set, self.plan.eval_indices, batch_size
                )
            return self._evaluate(step, reference)

        return halve_on_oom(
            at, self.eval_batch_size, step=step, clock=self.clock, min_size=self.limits.min_size
        )

    def _evaluate(self, step: str, reference: ReferenceBuffers | None = None) -> Evaluation:
        total = len(self.eval_loader)
        self.progress.start(Phase.evaluating, total)
        with self.timer(step), shape_guards_as_data_errors(self.limits):
            return evaluate(
                self.model,
                self.eval_loader,
                labeled=self.plan.labeled,
                plan=self.task,
                ignore_index=self.options.ignore_index,
                call_fn=self.call_fn,
                reference=reference,
                device=self.device,
                autocast_dtype=self.autocast_dtype,
                channels_last=self.options.channels_last,
                min_batch_size=self.limits.min_size,
                total_batches=total,
                progress=self.progress.batches(Phase.evaluating),
                should_stop=self.should_stop,
            )

    def _evaluate_source(self) -> Evaluation | None:
        """The original model on the labeled source set (``source_eval_path``), for the
        label-free estimate; None without one.

        Raises:
            InvalidOptionError: the model is not a classifier.
        """
        samples = load_source_eval(self.spec)
        if samples is None:
            return None
        if self.task.task != "classification":
            raise InvalidOptionError(
                f"a source evaluation set estimates classification top-1, and this model is "
                f"evaluated as {self.task.task}; leave source_eval out",
                field="source_eval_path",
            )
        loader = self._loader(samples, list(range(samples.num_samples)), self.eval_batch_size)
        self.progress.start(Phase.evaluating, len(loader))
        with self.timer("evaluate_source"), shape_guards_as_data_errors(self.limits):
            return evaluate(
                self.model,
                loader,
                labeled=True,
                plan=self.task,
                call_fn=self.call_fn,
                device=self.device,
                autocast_dtype=self.autocast_dtype,
                channels_last=self.options.channels_last,
                min_batch_size=self.limits.min_size,
                total_batches=len(loader),
                progress=self.progress.batches(Phase.evaluating),
                should_stop=self.should_stop,
            )

    def _recalibrate(self, batch_size: int) -> RecalibrationResult:
        loader = self._loader(self.plan.calibration, self.plan.calibration_indices, batch_size)
        self.progress.start(Phase.recalibrating, len(loader))
        if self.loaded.format == "onnx":
            with self.timer("recalibrate"):
                result = self._recalibrate_onnx(loader)
        else:
            with self.timer("recalibrate"), shape_guards_as_data_errors(self.limits):
                result = self._recalibrate_torch(loader)
        if result.dropped_samples:  # the one place that says so (the engine only counts)
            logger.warning(
                "calibrated on %d of %d samples: %d dropped (%s takes %s samples per call, "
                "and a train-mode BN needs 2 or more)",
                result.samples,
                len(self.plan.calibration_indices),
                result.dropped_samples,
                self.limits.model_name,
                self.limits.describe_batch(),
            )
        return result

    def _recalibrate_torch(self, loader: TimedBatches) -> RecalibrationResult:
        options = self.options
        return recalibrate(
            self.model,
            loader,
            estimator=options.estimator,
            momentum=options.momentum,
            prior_strength=options.prior_strength,
            tolerance=options.tolerance,
            tolerance_window=options.tolerance_window,
            device=self.device,
            channels_last=options.channels_last,
            autocast_dtype=self.autocast_dtype,
            batch_size_range=(self.limits.min_size, self.limits.max_size),
            call_fn=self.call_fn,
            total_batches=len(loader),
            progress=self.progress.batches(Phase.recalibrating),
            should_stop=self.should_stop,
        )

    def _recalibrate_onnx(self, loader: TimedBatches) -> RecalibrationResult:
        """The ONNX engine (worker.onnx) on the graph; the module then runs the new model."""
        from worker.onnx import recalibrate_onnx

        options, module = self.options, self.loaded.module
        done = recalibrate_onnx(
            module.proto,  # type: ignore[arg-type]
            loader,
            name=self.loaded.source_path.name,
            estimator=options.estimator,
            momentum=options.momentum,
            prior_strength=options.prior_strength,
            tolerance=options.tolerance,
            tolerance_window=options.tolerance_window,
            threads=torch.get_num_threads(),
            total_batches=len(loader),
            progress=self.progress.batches(Phase.recalibrating),
            should_stop=self.should_stop,
        )
        module.set_model(done.model)  # type: ignore[operator]
        return done.result

    def _export_onnx(self) -> ExportReport:
        """``options.export = ["onnx"]``: ``<stem>.recalibrated.onnx``, checked on an eval batch."""
        from worker.onnx.export import export_onnx

        plan, loaded = self.plan, self.loaded
        size = self.limits.fit(min(self.eval_batch_size, 16))
        example = plan.eval_set.get_batch(probe_indices(plan.eval_indices, size))[0]
        if isinstance(example, dict) and loaded.program is not None:
            example = tuple(example.values())  # a program takes its inputs in order
        out_path = self.out_dir / f"{loaded.source_path.stem}.recalibrated.onnx"
        return export_onnx(loaded.module.to("cpu"), example, out_path)

    def _fold_onnx(self) -> FoldReport:
        """:meth:`_fold` for an ONNX model: BN folded into its Conv/Gemm in a copy of the
        recalibrated graph (:mod:`worker.onnx.fold`), saved as ``<stem>.folded.onnx``."""
        import onnx

        from worker.onnx.fold import fold_bn_nodes
        from worker.onnx.module import OnnxModule

        loaded = self.loaded
        name = loaded.source_path.name
        fold = fold_bn_nodes(loaded.module.proto, name)  # type: ignore[arg-type]
        diff = max_output_diff(
            loaded.module,
            OnnxModule(fold.model, name),
            self.eval_loader,
            device=self.device,
            min_batch_size=self.limits.min_size,
            call_fn=self.call_fn,
            should_stop=self.should_stop,
        )
        out_path = self.out_dir / f"{loaded.source_path.stem}.folded.onnx"
        onnx.save_model(fold.model, str(out_path))
        return FoldReport(
            artifact=artifact(out_path, "onnx"),
            folded=len(fold.folded),
            not_folded=fold.not_folded,
            max_abs_diff=diff,
        )

    def _fold(self) -> FoldReport:
        """Fold BN into conv/linear, measure the output change on the eval data, save the copy."""
        loaded, plan = self.loaded, self.plan
        if loaded.format == "onnx":
            return self._fold_onnx()
        result = fold_batchnorm(loaded)
        try:
            diff = max_output_diff(
                loaded.module.to(self.device),
                result.module.to(self.device),
                self.eval_loader,
                device=self.device,
                min_batch_size=self.limits.min_size,
                call_fn=self.call_fn,
                should_stop=self.should_stop,
            )
        finally:
            loaded.module.to("cpu")
            result.module.to("cpu")
        example_size = self.limits.fit(2)
        indices = probe_indices(plan.calibration_indices, example_size)
        example = plan.calibration.get_batch(indices)[0]
        if isinstance(example, dict) and loaded.program is not None:
            example = tuple(example.values())  # a program takes its inputs in order
        artifact = save_folded(result, loaded, example, self.out_dir)
        return FoldReport(
            artifact=artifact,
            folded=result.folded,
            not_folded=result.not_folded,
            max_abs_diff=diff,
        )
