"""A job spec run in the sandbox, from a trusted process: a work horse or ``recalib run``.

The trusted process owns the files and the network; the job's process
(:mod:`worker.runner.job_process`) gets only what :func:`confinement_for` lists. Both entrances use
:func:`run_in_runner` and :func:`finish_report`, so a model runs, and its report is completed, the
same way however it was submitted. Torch-free.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from recalib.contract import JobSpec, Progress, Report, SandboxUsed
from recalib.errors import InternalError, RecalibError, UserError
from recalib.settings import Settings
from worker.runner.client import ConfinedJob, Outcome, RunnerLostError
from worker.runner.protocol import PID_ENV, SOCKET_ENV, JobRequest
from worker.runner.supervise import RunnerProcess
from worker.sandbox.confine import JobConfinement

SANDBOX_ENV = "RECALIB_SANDBOX_STATUS"
"""Set by the worker once it checked the sandbox; what reports say (``strict:landlock-abi7,…``)."""


def sandbox_used(settings: Settings) -> SandboxUsed:
    """The sandbox this process's jobs run in, as the worker checked it (or the setting)."""
    level, _, mechanisms = os.environ.get(SANDBOX_ENV, "").partition(":")
    if not level:
        return SandboxUsed(level=settings.sandbox, mechanisms=[])
    return SandboxUsed(level=level, mechanisms=[m for m in mechanisms.split(",") if m])  # type: ignore[arg-type]


def data_workers(settings: Settings) -> int:
    """DataLoader processes decoding image archives (``RECALIB_DATA_WORKERS``, -1: min(8, CPU
    cores - 1)); only at sandbox level ``off``, since the sandbox lets a job start no process."""
    if settings.sandbox != "off":
        return 0
    if settings.data_workers >= 0:
        return settings.data_workers
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def confinement_for(
    spec: JobSpec, inputs: Sequence[Path | str], tmp_dir: Path, settings: Settings
) -> JobConfinement:
    """What the job's process may touch and use: its ``inputs`` (files or directories, read-only),
    its output and scratch directories,
    the job's memory (``RECALIB_JOB_MEMORY_MB``, not on a GPU) and CPU time (the job timeout on
    every core)."""
    gpu = spec.options.device != "cpu" and os.path.exists("/dev/nvidiactl")
    memory = 0 if gpu else settings.job_memory_mb * 1024 * 1024
    return JobConfinement(
        inputs=tuple(str(path) for path in inputs),
        out_dir=spec.out_dir,
        tmp_dir=str(tmp_dir),
        memory_bytes=memory,
        cpu_s=settings.job_timeout_s * (os.cpu_count() or 1) + 60,
        file_bytes=max(2 * settings.max_upload_bytes, 1 << 30),
        gpu=gpu,
    )


def run_in_runner(
    job: ConfinedJob,
    settings: Settings,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log_level: str | None = None,
) -> Outcome:
    """``job`` run by this worker's warm runner (``RECALIB_RUNNER_SOCKET``), or by a one-shot
    runner started for it.

    Raises:
        RunnerLostError: the runner died, or did not start.
    """
    path = os.environ.get(SOCKET_ENV)
    if path:
        runner_pid = int(os.environ.get(PID_ENV) or 0)
        job.socket_path = path
        return job.run(on_progress=on_progress, should_stop=should_stop,
                       runner_alive=lambda: _alive(runner_pid))  # fmt: skip
    runner = RunnerProcess(settings, "one-shot", one_shot=True, log_level=log_level)
    try:
        runner.start()
        if not runner.wait_ready(lambda: None, 1.0):
            raise RunnerLostError(f"the job runner did not start ({runner.death()})")
        job.socket_path = str(runner.socket_path)
        return job.run(on_progress=on_progress, should_stop=should_stop,
                       runner_alive=runner.alive)  # fmt: skip
    finally:
        runner.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie its worker has yet to reap)."""
    if pid <= 0:
        return True  # unknown: end of file decides
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc here: end of file decides
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def finish_report(spec: JobSpec, report: Report, out_dir: Path, settings: Settings) -> Report:
    """The trusted side's part of a report: the sandbox that ran it and, with
    ``options.register``, the MLflow model version registered from ``out_dir`` (the caller
    rewrites ``report.json``)."""
    report = report.model_copy(update={"sandbox": sandbox_used(settings)})
    if spec.options.register is not None:  # network and credentials: never in the sandbox
        from recalib.registry.models import register_job_output

        registered = register_job_output(spec, report, out_dir, settings.mlflow_tracking_uri)
        report = report.model_copy(update={"registered": registered})
    return report


def rewrite_report(report: Report, out_dir: Path) -> None:
    """``out_dir/report.json`` replaced by ``report`` atomically (``recalib run``'s last step)."""
    target = out_dir / "report.json"
    tmp = target.with_name(".report.json.final")
    tmp.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, target)


def run_spec(
    spec: JobSpec, settings: Settings, *, on_progress: Callable[[Progress], None] | None = None
) -> Report:
    """``recalib run``: ``spec`` in a one-shot runner's sandbox; its report, completed.

    Raises:
        SandboxUnavailableError: the sandbox level cannot be provided here.
        RecalibError: the job failed (a subclass with the job's error type where one exists).
    """
    from worker.sandbox.levels import check

    status = check(settings.sandbox)
    os.environ[SANDBOX_ENV] = f"{status.level}:{','.join(status.mechanisms)}"
    out_dir = Path(spec.out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = spec.model_copy(update={
        "out_dir": str(out_dir),
        **{k: str(Path(v).absolute())
           for k in ("model_path", "calibration_path", "eval_path", "source_eval_path")
           if (v := getattr(spec, k))},
    })  # fmt: skip
    inputs = [
        p
        for p in (spec.model_path, spec.calibration_path, spec.eval_path, spec.source_eval_path)
        if p
    ]
    with tempfile.TemporaryDirectory(prefix="recalib-job-") as tmp:
        confinement = confinement_for(spec, inputs, Path(tmp), settings)
        request = JobRequest(spec=spec.model_dump(mode="json"), confinement=confinement,
                             level=status.level)  # fmt: skip
        try:
            job = ConfinedJob("", request)
            outcome = run_in_runner(job, settings, on_progress=on_progress, log_level="WARNING")
        except RunnerLostError as exc:
            raise InternalError(str(exc)) from None
    if outcome.report is None:
        raise _error_of(outcome)
    report = finish_report(spec, outcome.report, out_dir, settings)
    rewrite_report(report, out_dir)
    return report


def _error_of(outcome: Outcome) -> RecalibError:
    """The exception ``recalib run`` raises for a job that did not succeed (exit codes by class)."""
    from recalib.errors import JobCancelledError

    if outcome.cancelled or outcome.error is None:
        return JobCancelledError("the job was cancelled")
    slug = outcome.error.type
    classes: list[type[RecalibError]] = [RecalibError]
    known = {}
    while classes:
        cls = classes.pop()
        known.setdefault(cls.type_slug, cls)
        classes.extend(cls.__subclasses__())
    cls = known.get(slug)
    if cls is None or (cls is InternalError and slug != "internal-error"):
        error = UserError(outcome.error.message)
        error.type_slug = slug  # type: ignore[misc]  (sandbox-violation, say)
        return error
    return cls(outcome.error.message)
