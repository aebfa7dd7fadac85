"""seccomp (through libseccomp's ``pyseccomp`` binding): the system calls a job may not make.

:func:`install_job_filter` loads a filter (built ahead by :func:`prepare_job_filter` in the
runner that forks the jobs, or there and then) into the calling process (all its threads, its
future threads; irrevocable). Every forbidden call is not executed: the kernel suspends the
caller and hands the call to the trusted parent through a *listener* file descriptor
(``SECCOMP_RET_USER_NOTIF``); the parent (:class:`Listener`) records what was attempted and answers
``EPERM``. So a job that tries is refused *and* the attempt is known even when the model swallows
the error: the job then fails naming it (:func:`describe`).

Forbidden (:data:`FORBIDDEN`): creating sockets (``socket``, ``socketpair``; the job talks only
over the socket it inherited), ``connect``/``bind``/``listen``/``accept``; running programs
(``execve``, ``execveat``); new processes (``fork``, ``vfork``, ``clone`` without
``CLONE_THREAD``: threads stay allowed; ``clone3`` answers ``ENOSYS`` so that the C library falls
back to ``clone``, which can be inspected); reading or writing other processes (``ptrace``,
``process_vm_readv``/``writev``); namespaces, mounts, kernel keyrings, BPF, ``perf_event_open``,
``userfaultfd``, ``io_uring`` (its requests would bypass this filter), module and kexec loading.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

CLONE_THREAD = 0x00010000
FORBIDDEN = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "personality",
)  # fmt: skip

_WHAT = {
    "socket": "opening a socket",
    "socketpair": "opening a socket pair",
    "connect": "connecting a socket",
    "bind": "binding a socket",
    "execve": "running a program (execve)",
    "execveat": "running a program (execveat)",
    "fork": "starting a process (fork)",
    "vfork": "starting a process (vfork)",
    "clone": "starting a process (fork)",
    "ptrace": "tracing another process (ptrace)",
    "process_vm_readv": "reading another process's memory",
    "process_vm_writev": "writing another process's memory",
}
_FAMILIES = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK", 17: "AF_PACKET"}

# struct seccomp_notif: u64 id, u32 pid, u32 flags, struct seccomp_data {s32 nr, u32 arch,
# u64 instruction_pointer, u64 args[6]}; struct seccomp_notif_resp: u64 id, s64 val, s32 error,
# u32 flags. ioctl numbers are _IOWR('!', 0 / 1, size).
_NOTIF = struct.Struct("=QIIiIQ6Q")
_RESP = struct.Struct("=QqiI")
_IOCTL_RECV = (3 << 30) | (_NOTIF.size << 16) | (ord("!") << 8) | 0
_IOCTL_SEND = (3 << 30) | (_RESP.size << 16) | (ord("!") << 8) | 1


class SeccompError(OSError):
    """libseccomp is missing, or the kernel refused the filter."""


@dataclass(frozen=True)
class Attempt:
    """A forbidden system call a job made: its name and first argument."""

    syscall: str
    arg0: int

    def describe(self) -> str:
        what = _WHAT.get(self.syscall, f"the system call {self.syscall}")
        if self.syscall in ("socket", "socketpair"):
            what += f" ({_FAMILIES.get(self.arg0, f'family {self.arg0}')})"
        return what


def _seccomp():  # type: ignore[no-untyped-def]
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # the binding, or libseccomp.so.2 under it
        raise SeccompError(0, f"seccomp: libseccomp is not usable ({exc})") from exc
    return pyseccomp


def available() -> str | None:
    """None when a job filter can be built here, else why not."""
    try:
        sc = _seccomp()
        if sc.get_api() < 6:  # API 6: user notification with a listener (libseccomp >= 2.5)
            return f"seccomp: libseccomp API level {sc.get_api()} < 6 (user notification)"
    except SeccompError as exc:
        return str(exc)
    return None


_prepared_filter = None
"""The job filter built ahead of the jobs (:func:`prepare_job_filter`), loaded by each of them."""


def _job_filter():  # type: ignore[no-untyped-def]
    sc = _seccomp()
    f = sc.SyscallFilter(sc.ALLOW)
    for name in FORBIDDEN:
        with contextlib.suppress(ValueError, OSError):  # not a system call on this arch
            f.add_rule(sc.NOTIFY, name)
    f.add_rule(sc.NOTIFY, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    return f


def prepare_job_filter() -> None:
    """Build the job filter now, in a process that forks the jobs (the runner): adding its rules
    takes ~9 ms (libseccomp resolves each name), which each forked job would pay again; a job
    then only loads its copy (0.1 ms). Nothing is loaded here.

    Raises:
        SeccompError: libseccomp is missing or refused a rule.
    """
    global _prepared_filter
    try:
        _prepared_filter = _job_filter()
    except OSError as exc:
        raise SeccompError(
            exc.errno or 0, f"seccomp: building the job filter failed: {exc}"
        ) from exc


def install_job_filter() -> int:
    """Load the job filter into this process; returns its listener fd (for the trusted parent).

    Raises:
        SeccompError: libseccomp or the kernel refused.
    """
    try:
        f = _prepared_filter if _prepared_filter is not None else _job_filter()
        f.load()
    except OSError as exc:
        raise SeccompError(
            exc.errno or 0, f"seccomp: loading the job filter failed: {exc}"
        ) from exc
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_notify_fd.argtypes = (ctypes.c_void_p,)
    fd = int(lib.seccomp_notify_fd(f._filter))  # the binding has no accessor for the listener
    if fd < 0:
        raise SeccompError(-fd, "seccomp: the job filter has no listener")
    return os.dup(fd)  # ours: libseccomp closes its own when the filter object is released


class Listener:
    """The trusted side of a job's filter: answers each forbidden call EPERM and remembers it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.attempts: list[Attempt] = []
        self._names: dict[int, str] = {}

    def handle(self) -> bool:
        """Answer one pending call (the fd is readable); False once the job has gone."""
        buf = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(self.fd, _IOCTL_RECV, buf)
        except OSError as exc:  # interrupted, or the caller died: still there; else gone
            return exc.errno in (errno.EINTR, errno.ENOENT)
        notif_id, _pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
        attempt = Attempt(self._name(nr), args[0])
        if attempt not in self.attempts and len(self.attempts) < 32:
            self.attempts.append(attempt)
        with contextlib.suppress(OSError):  # the caller may have been killed meanwhile
            fcntl.ioctl(self.fd, _IOCTL_SEND, bytearray(_RESP.pack(notif_id, 0, -errno.EPERM, 0)))
        return True

    def _name(self, nr: int) -> str:
        if nr not in self._names:
            try:
                sc = _seccomp()
                self._names[nr] = sc.resolve_syscall(sc.system_arch(), nr).decode()
            except (SeccompError, OSError, ValueError):
                self._names[nr] = f"#{nr}"
        return self._names[nr]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
