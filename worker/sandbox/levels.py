"""Sandbox levels (``RECALIB_SANDBOX``) and the check that the machine provides them.

- ``strict`` (default): Landlock (ABI >= 4, so that TCP is covered too), seccomp with user
  notification, and a network namespace of the runner's own;
- ``basic``: Landlock and seccomp, no network namespace (for containers that forbid
  ``unshare``; seccomp and Landlock still deny every socket and TCP connection);
- ``off``: nothing; the model runs with the worker's rights. Only for a trusted single user.

:func:`check` is what a worker, ``recalib run`` and a runner call before anything else: it raises
:class:`SandboxUnavailableError`, one line naming the missing mechanism and the setting, unless
the level's mechanisms all work here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from recalib.errors import RecalibError
from worker.sandbox import landlock, syscalls
from worker.sandbox.namespaces import unshare_network

SandboxLevel = Literal["strict", "basic", "off"]
LEVELS: tuple[SandboxLevel, ...] = ("strict", "basic", "off")
MIN_LANDLOCK_ABI = 4


class SandboxUnavailableError(RecalibError):
    """The configured sandbox level needs a mechanism this kernel or container lacks."""

    type_slug = "sandbox-unavailable"
    title = "Sandbox unavailable"
    http_status = 503


@dataclass(frozen=True)
class SandboxStatus:
    """The level and what enforces it here, e.g. ``["landlock-abi7", "seccomp", "netns"]``."""

    level: SandboxLevel
    mechanisms: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.level} ({', '.join(self.mechanisms) or 'none'})"


def _can_unshare_network() -> str | None:
    """None if this process could enter a network namespace (tried in a throwaway child)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_end)
        try:
            unshare_network()
            os.write(write_end, b"ok")
        except OSError as exc:
            os.write(write_end, str(exc).encode()[:500])
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        said = answer.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return None if said == "ok" else said or "the probe died"


def check(level: str) -> SandboxStatus:
    """The status of ``level`` here.

    Raises:
        SandboxUnavailableError: one of its mechanisms is missing (the message names it and what
            to set instead), or the level is unknown.
    """
    if level not in LEVELS:
        raise SandboxUnavailableError(
            f"RECALIB_SANDBOX={level!r} is not a sandbox level (one of: {', '.join(LEVELS)})"
        )
    if level == "off":
        return SandboxStatus("off", ())
    abi = landlock.abi_version()
    if abi < MIN_LANDLOCK_ABI:
        found = f"ABI {abi}" if abi else "absent"
        raise SandboxUnavailableError(
            f"RECALIB_SANDBOX={level} needs Landlock ABI >= {MIN_LANDLOCK_ABI} (Linux >= 6.7 "
            f"with landlock in lsm=); this kernel's Landlock is {found}. Set RECALIB_SANDBOX=off "
            "to run models unsandboxed (trusted models only)"
        )
    if (why := syscalls.available()) is not None:
        raise SandboxUnavailableError(
            f"RECALIB_SANDBOX={level} needs seccomp: {why}. Install libseccomp2 (>= 2.5) or set "
            "RECALIB_SANDBOX=off (trusted models only)"
        )
    mechanisms = [f"landlock-abi{abi}", "seccomp"]
    if level == "strict":
        if (why := _can_unshare_network()) is not None:
            raise SandboxUnavailableError(
                f"RECALIB_SANDBOX=strict needs a network namespace: {why}. Allow unshare "
                "(user namespaces, or CAP_SYS_ADMIN) or set RECALIB_SANDBOX=basic (Landlock and "
                "seccomp still deny every socket)"
            )
        mechanisms.append("netns")
    return SandboxStatus(level, tuple(mechanisms))  # type: ignore[arg-type]
