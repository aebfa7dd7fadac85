"""The trusted side of a job in a runner: send the request, relay progress, judge the ending.

Used by a work horse (its worker's warm runner, or a one-shot runner of its own) and by
``recalib run`` alike: one path for every model. Torch-free. What the job's process says is
untrusted (it is the model's process): the report is validated against the contract, and the
runner's ``exit`` line, which the model cannot forge, overrides it: a job whose process made a
forbidden system call fails ``sandbox-violation`` naming it, whatever the process reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from recalib.contract import JobError, Progress, Report
from worker.runner.protocol import (
    SANDBOX_VIOLATION,
    JobRequest,
    LineReader,
    encode_request,
    send_line,
)

logger = logging.getLogger(__name__)


class RunnerLostError(RuntimeError):
    """The runner ended (or was unreachable) before the job's end was known."""


@dataclass
class Outcome:
    """How a job ended: a report, an error, or cancelled (neither)."""

    report: Report | None = None
    error: JobError | None = None
    cancelled: bool = False
    attempts: list[str] = field(default_factory=list)


class ConfinedJob:
    """One job sent to a runner over ``socket_path``; :attr:`pid` is its process once started."""

    def __init__(self, socket_path: str, request: JobRequest) -> None:
        self.socket_path, self.request = socket_path, request
        self.pid: int | None = None
        self.sock: socket.socket | None = None

    def run(
        self,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        runner_alive: Callable[[], bool] | None = None,
    ) -> Outcome:
        """Run the job to its end. ``should_stop`` is asked every half second (True: cancel).

        Raises:
            RunnerLostError: the runner died or could not be reached.
        """
        self.sock = sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(self.socket_path)
                send_line(sock, encode_request(self.request))
            except OSError as exc:
                raise RunnerLostError(f"the job runner is unreachable ({exc})") from exc
            return self._follow(LineReader(sock), on_progress, should_stop, runner_alive)
        finally:
            sock.close()

    def _follow(
        self,
        reader: LineReader,
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        runner_alive: Callable[[], bool] | None,
    ) -> Outcome:
        said: dict[str, object] = {}
        stop_sent = False

        def stop_if_asked() -> None:
            nonlocal stop_sent
            if not stop_sent and should_stop is not None and should_stop():
                stop_sent = True
                with contextlib.suppress(OSError):
                    send_line(self.sock, {"stop": True})  # type: ignore[arg-type]

        def still_there() -> bool:
            stop_if_asked()
            return runner_alive() if runner_alive is not None else True

        while True:
            try:
                message = reader.read(still_there=still_there)
            except OSError as exc:
                raise RunnerLostError(f"the job runner's connection failed ({exc})") from exc
            if message is None:
                raise RunnerLostError("the job runner died during the job")
            stop_if_asked()  # progress may never pause long enough for a read to time out
            event = message.get("event")
            if event == "started" and self.pid is None:
                self.pid = int(message.get("pid") or 0) or None
            elif event == "progress" and on_progress is not None:
                with contextlib.suppress(ValidationError, TypeError):
                    on_progress(Progress.model_validate(message.get("progress")))
            elif event in ("report", "error") and "end" not in said:
                said = {"end": event, **message}
            elif event == "exit":
                return _judge(said, message)

    def kill(self) -> None:
        """SIGKILL the job's process (the job timeout): the runner then reports its exit."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)


def _judge(said: dict[str, object], exit_line: dict[str, object]) -> Outcome:
    attempts = [str(a) for a in exit_line.get("attempts") or []][:32]
    status = str(exit_line.get("status") or "unknown")
    if attempts:
        message = (
            f"the model attempted {'; '.join(attempts)}: refused by the sandbox (seccomp), and "
            "the job was failed"
        )
        return Outcome(error=JobError(type=SANDBOX_VIOLATION, message=message), attempts=attempts)
    if said.get("end") == "error":
        kind = str(said.get("type") or "internal-error")[:64]
        if kind == "cancelled":
            return Outcome(cancelled=True)
        return Outcome(error=JobError(type=kind, message=str(said.get("message") or "")[:4000]))
    if said.get("end") == "report" and status == "exit status 0":
        try:
            return Outcome(report=Report.model_validate(said.get("report")))
        except ValidationError as exc:
            why = exc.errors()[0]["msg"]
            message = f"the job's process returned a report that is not valid ({why})"
            return Outcome(error=JobError(type="internal-error", message=message))
    return Outcome(error=JobError(type="internal-error", message=_died(status)))


def _died(status: str) -> str:
    if "SIGXCPU" in status:
        return "the job's process used up its CPU time (RECALIB_JOB_TIMEOUT_S) and was killed"
    if "SIGXFSZ" in status:
        return "the job's process wrote a file over its size limit and was killed"
    return f"the job's process ended without a result ({status}); the worker log may say why"
