"""A job's own process: forked by the runner for one job, confined, runs it, exits.

:func:`run_confined` never returns. It confines the process (:func:`worker.sandbox.confine.enter`),
hands the seccomp listener to the runner, then runs :func:`worker.pipeline.run_job` on the job's
files and reports on the trusted side's connection (events of :mod:`worker.runner.protocol`).
Nothing of the job outlives it: the next job gets a fresh process forked from the runner, which
never loads a user's model, so no model, tensor or Python state of one job (or tenant) is ever
seen by another. Cancellation arrives on the same connection (``{"stop": true}``); its end of
file means the trusted side is gone, and the process exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import traceback
from typing import NoReturn

from recalib.contract import JobSpec, Progress
from recalib.errors import JobCancelledError, RecalibError, UserError, error_type_name
from worker.runner.protocol import HORSE_GONE_EXIT, SANDBOX_VIOLATION, JobRequest, send_line
from worker.sandbox import confine

logger = logging.getLogger(__name__)


class _Connection:
    """The trusted side's connection as the job sees it: events out, stop requests in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.stopped = sock, False

    def send(self, message: dict[str, object]) -> None:
        send_line(self.sock, message)

    def progress(self, progress: Progress) -> None:
        self.send({"event": "progress", "progress": progress.model_dump(mode="json")})

    def should_stop(self) -> bool:
        while not self.stopped and select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(4096)
            if not data:  # the trusted side is gone: nobody is left to report to
                os._exit(HORSE_GONE_EXIT)
            self.stopped = b'"stop"' in data
        return self.stopped


def run_confined(sock: socket.socket, runner_side: socket.socket, request: JobRequest) -> NoReturn:
    """Confine this (freshly forked) process, run the job, report it, exit."""
    connection = _Connection(sock)
    code = 0
    try:
        spec = JobSpec.model_validate(request.spec)
        if spec.arch:  # the operator's allowlisted code: imported before the door closes
            from worker.formats.state_dict import resolve_arch

            resolve_arch(spec.arch, spec.arch_allowlist)
        listener = confine.enter(request.confinement, request.level)
        if listener is not None:
            socket.send_fds(runner_side, [b"listener"], [listener])
            os.close(listener)
        runner_side.close()
        connection.send({"event": "started", "pid": os.getpid()})
        _run(connection, request, spec)
    except BaseException as exc:  # everything ends as an event; nothing escapes the process
        code = 1
        _report_failure(connection, exc)
    finally:
        os._exit(code)


def _run(connection: _Connection, request: JobRequest, spec: JobSpec) -> None:
    import torch

    from worker.formats.op_allowlist import model_allowlists
    from worker.pipeline import run_job

    if request.threads > 0:
        torch.set_num_threads(request.threads)
    with model_allowlists(enabled=spec.vet_models):
        report = run_job(
            spec,
            on_progress=connection.progress,
            should_stop=connection.should_stop,
            data_workers=request.data_workers if request.level == "off" else 0,  # no fork in it
        )
    connection.send({"event": "report", "report": json.loads(report.model_dump_json())})


def _report_failure(connection: _Connection, exc: BaseException) -> None:
    chain = _chain(exc)
    if any(isinstance(e, JobCancelledError) for e in chain):
        error = {"type": JobCancelledError.type_slug, "message": "cancelled"}
    elif (denied := _denied(chain)) is not None:
        error = {"type": SANDBOX_VIOLATION, "message": denied}
    elif isinstance(exc, UserError):
        error = {"type": error_type_name(exc), "message": str(exc)}
    elif isinstance(exc, RecalibError):
        error = {"type": "internal-error", "message": exc.message}
    else:
        traceback.print_exception(exc)  # the runner's stderr: the worker's log
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        message = f"internal error in the worker ({type(exc).__name__}{': ' if detail else ''}"
        error = {"type": "internal-error", "message": f"{message}{detail}); the worker log has "
                 "the details"}  # fmt: skip
    with contextlib.suppress(OSError):  # the trusted side is gone: the exit status says it
        connection.send({"event": "error", **error})


def _denied(chain: list[BaseException]) -> str | None:
    """What the sandbox refused, if that is why the job failed: a permission error on a path
    (Landlock), from Python or from torch (whose messages carry ``Permission denied``)."""
    for exc in chain:
        if isinstance(exc, PermissionError) and exc.filename is not None:
            return (
                f"the model tried to access {exc.filename!s}, outside the job's files: denied by "
                "the sandbox (Landlock)"
            )
        if "Permission denied" in str(exc) and not isinstance(exc, UserError):
            line = next(ln for ln in str(exc).splitlines() if "Permission denied" in ln)
            return f"the model was denied by the sandbox (Landlock): {line.strip()[:300]}"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain
