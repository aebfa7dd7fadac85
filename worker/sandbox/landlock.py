"""Landlock (Linux ≥ 5.13), through its three system calls: a process restricts itself, for good.

:func:`restrict_self` builds one ruleset and enforces it on the calling thread and every thread and
process it creates afterwards (call it single-threaded, or before any other thread exists, so that
no thread is left outside). What it handles (by ABI version, :func:`abi_version`):

- the filesystem (ABI 1+): only the paths given are reachable, read-only or read-write; nothing
  else, ``/proc/<other pid>`` included. Read-write never includes making symlinks, sockets, FIFOs
  or device nodes, linking or renaming in from elsewhere (``REFER``) or executing;
- TCP (ABI 4+): no ``bind`` and no ``connect`` on any port;
- scopes (ABI 6+): no abstract Unix socket and no signal to a process outside the domain.

Landlock also confines ``ptrace`` to processes inside the domain. Layers stack: a process can only
ever narrow what its parent allowed. Unknown flags of a newer ABI are never sent to an older kernel.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterable
from pathlib import Path

_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# filesystem access rights, by the ABI that introduced them
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ_ONLY = EXECUTE | READ_FILE | READ_DIR
"""For installed code and libraries (execute only matters to ``execve``, which seccomp denies)."""
DATA_READ_ONLY = READ_FILE | READ_DIR
READ_WRITE = (
    READ_FILE | READ_DIR | WRITE_FILE | TRUNCATE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG
)


class LandlockError(OSError):
    """Landlock is missing or refused the ruleset (``errno`` and the call that failed)."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _numbers() -> tuple[int, int, int]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise LandlockError(0, f"Landlock: no system call numbers known for {machine}")
    return _SYSCALLS[machine]


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is absent or disabled."""
    try:
        create, _, _ = _numbers()
    except LandlockError:
        return 0
    libc = _libc()
    version = libc.syscall(
        create, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
    )
    return max(0, int(version))


def handled_fs(abi: int) -> int:
    """Every filesystem right the kernel of ``abi`` knows (ABI 4 and 6 added none)."""
    return _FS_BY_ABI[max(v for v in _FS_BY_ABI if v <= abi)]


def restrict_self(
    read_only: Iterable[Path],
    read_write: Iterable[Path] = (),
    *,
    data_read_only: Iterable[Path] = (),
    devices: Iterable[Path] = (),
) -> int:
    """Allow only these paths (and what lies beneath) from now on; deny TCP and outside scopes.

    ``read_only``: code and libraries; ``data_read_only``: data (no execute); ``read_write``:
    output directories; ``devices``: device files opened read-write with their ioctls
    (``/dev/null``, GPU device files). Paths that do not exist are skipped. Returns the ABI
    version enforced.

    Raises:
        LandlockError: Landlock is unavailable or refused a rule.
    """
    abi = abi_version()
    if abi < 1:
        raise LandlockError(0, "Landlock is not available in this kernel (Linux >= 5.13 with "
                               "landlock in the lsm= boot list)")  # fmt: skip
    create, add_rule, restrict = _numbers()
    fs = handled_fs(abi)
    attr = _RulesetAttr(
        handled_access_fs=fs,
        handled_access_net=(NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
        scoped=(SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0,
    )
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    libc = _libc()
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise LandlockError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        rules = [(p, READ_ONLY) for p in read_only] + [(p, DATA_READ_ONLY) for p in data_read_only]
        rules += [(p, READ_WRITE) for p in read_write]
        rules += [(p, READ_FILE | WRITE_FILE | IOCTL_DEV) for p in devices]
        for path, access in rules:
            _add_path_rule(libc, add_rule, ruleset, Path(path), access & fs)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(restrict, ruleset, ctypes.c_uint32(0)) != 0:
            raise LandlockError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return abi


def _add_path_rule(libc: ctypes.CDLL, add_rule: int, ruleset: int, path: Path, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not os.path.isdir(path):  # a file: only the rights that apply to files
            access &= EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
        rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        if libc.syscall(add_rule, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            err = ctypes.get_errno()
            raise LandlockError(err, f"landlock_add_rule({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)
