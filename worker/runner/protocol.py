"""What the trusted side (a work horse, ``recalib run``) and a runner say over a Unix socket.

One connection per job. The trusted side sends one line, a :class:`JobRequest` (the job's spec,
its confinement and the sandbox level); it may later send ``{"stop": true}`` (the job was
cancelled). It then reads event lines until ``exit``:

- ``{"event": "started", "pid": N}``: the job's sandboxed process (from that process);
- ``{"event": "progress", "progress": {...}}``: a :class:`~recalib.contract.Progress`;
- ``{"event": "report", "report": {...}}`` or ``{"event": "error", "type": slug, "message": m}``:
  how the job ended, as its process saw it (untrusted: it is the model's process);
- ``{"event": "exit", "status": "exit status 0", "attempts": [...]}``: from the runner once the
  job's process is gone: how it ended and the forbidden system calls it tried (trusted).

End of file before ``exit`` means the runner died; a trusted side then exits with
:data:`RUNNER_LOST_EXIT`. A trusted side that goes away closes the connection: the runner kills
the job's process at once, so no job continues unsupervised.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from worker.sandbox.confine import JobConfinement

SOCKET_ENV = "RECALIB_RUNNER_SOCKET"
"""Set by a warm worker before it forks a horse: the runner's socket path."""
PID_ENV = "RECALIB_RUNNER_PID"
"""Set with it: the runner's pid."""

RUNNER_LOST_EXIT = 75
"""A horse's exit status when its runner died during the run (EX_TEMPFAIL)."""
HORSE_GONE_EXIT = 76
"""A job process's exit status when the trusted side of its job went away."""
SANDBOX_VIOLATION = "sandbox-violation"
"""The error type of a job in which the sandbox refused something."""
MAX_LINE_BYTES = 32 * 1024 * 1024
"""A report line of a model with thousands of BN layers stays far below this."""


@dataclass(frozen=True)
class JobRequest:
    """Run ``spec`` (a :class:`~recalib.contract.JobSpec` as JSON) confined to ``confinement``
    at sandbox ``level`` with ``threads`` intra-op threads (0: torch's default)."""

    spec: dict[str, Any]
    confinement: JobConfinement
    level: str
    threads: int = 0
    job_id: str = ""
    data_workers: int = 0


def send_line(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


class LineReader:
    """JSON object lines from a socket (buffered: one recv may bring several)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self._buffer = sock, bytearray()

    def read(
        self, still_there: Callable[[], bool] | None = None, every_s: float = 0.5
    ) -> dict[str, Any] | None:
        """The next object; None at end of file, on a garbled or oversized line, or as soon as
        ``still_there`` (asked every ``every_s`` seconds without data) says False."""
        self.sock.settimeout(every_s if still_there is not None else None)
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                if still_there is not None and not still_there():
                    return None
                continue
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE_BYTES:
                return None
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def read_line(sock: socket.socket) -> dict[str, Any] | None:
    """One JSON object line, read byte by byte (nothing after it is consumed)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte or len(data) > MAX_LINE_BYTES:
            return None
        data += byte
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def encode_request(request: JobRequest) -> dict[str, Any]:
    return asdict(request)


def decode_request(message: dict[str, Any] | None) -> JobRequest | None:
    if message is None:
        return None
    try:
        confinement = message["confinement"]
        return JobRequest(
            spec=dict(message["spec"]),
            confinement=JobConfinement(
                inputs=tuple(str(p) for p in confinement["inputs"]),
                out_dir=str(confinement["out_dir"]),
                tmp_dir=str(confinement["tmp_dir"]),
                memory_bytes=int(confinement.get("memory_bytes", 0)),
                cpu_s=int(confinement.get("cpu_s", 0)),
                file_bytes=int(confinement.get("file_bytes", 0)),
                gpu=bool(confinement.get("gpu", False)),
            ),
            level=str(message["level"]),
            threads=int(message.get("threads", 0)),
            job_id=str(message.get("job_id", "")),
            data_workers=int(message.get("data_workers", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return None
