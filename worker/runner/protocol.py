"""What a work horse and the warm runner say to each other over the runner's Unix socket.

One connection per run: the horse sends one JSON line (:class:`RunRequest`), the runner answers
one JSON line when the run has ended its job's record (``{"ok": true}``, or ``{"ok": false,
"error": ...}`` when it could not even start the run). End of file instead of an answer means
the runner died; the horse then exits with :data:`RUNNER_LOST_EXIT`, and its worker, which
started the runner, says how the runner died. A horse that goes away (killed) closes the
connection, and the runner, which watches for that, exits at once: the run is abandoned, never
left running unsupervised.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

SOCKET_ENV = "RECALIB_RUNNER_SOCKET"
"""Set by a warm worker before it forks a horse: the runner's socket path."""
PID_ENV = "RECALIB_RUNNER_PID"
"""Set with it: the runner's pid (a horse past the job timeout kills the runner)."""

RUNNER_LOST_EXIT = 75
"""A horse's exit status when its runner died during the run (EX_TEMPFAIL)."""
HORSE_GONE_EXIT = 76
"""The runner's exit status when the horse of the running job went away."""
MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True)
class RunRequest:
    """Run ``job_id`` once, as RQ job ``rq_job_id`` of worker ``worker``."""

    job_id: str
    rq_job_id: str | None
    worker: str


def send_line(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def read_line(
    sock: socket.socket, still_there: Callable[[], bool] | None = None, every_s: float = 0.5
) -> dict[str, Any] | None:
    """One JSON object line; None at end of file (the peer is gone) or on a garbled line.

    With ``still_there``, it is asked every ``every_s`` seconds without data, and None is
    returned as soon as it says False: end of file alone can come late, when processes forked
    from the peer (DataLoader workers) still hold copies of its end of the connection.
    """
    if still_there is not None:
        sock.settimeout(every_s)
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            if still_there is not None and not still_there():
                return None
            continue
        if not chunk:
            return None
        data += chunk
        if len(data) > MAX_LINE_BYTES:
            return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def encode_request(request: RunRequest) -> dict[str, Any]:
    return asdict(request)


def decode_request(message: dict[str, Any] | None) -> RunRequest | None:
    if message is None:
        return None
    try:
        return RunRequest(
            job_id=str(message["job_id"]),
            rq_job_id=message.get("rq_job_id"),
            worker=str(message["worker"]),
        )
    except (KeyError, TypeError):
        return None
