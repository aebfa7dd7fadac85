"""A network namespace of its own: no interface but a loopback that is down, so no route anywhere.

Entered by the warm runner before it starts any thread (``unshare`` of a user namespace needs a
single-threaded caller). As root (or with ``CAP_SYS_ADMIN``) a network namespace alone; otherwise
inside a new user namespace, which unprivileged processes may create where the kernel and the
container allow it. Files keep their owners: the process's real ids do not change.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def unshare_network() -> str:
    """Move this process into a new network namespace; returns how (``netns`` or
    ``userns+netns``).

    Raises:
        OSError: neither was permitted (errno and both attempts in the message).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return "netns"
    first = ctypes.get_errno()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "userns+netns"
    second = ctypes.get_errno()
    raise OSError(
        second,
        f"unshare(CLONE_NEWNET): {os.strerror(first)}; "
        f"unshare(CLONE_NEWUSER|CLONE_NEWNET): {os.strerror(second)}",
    )
