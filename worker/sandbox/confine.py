"""Confine the calling process to one job: called in the job's process, before the model loads.

Order matters: resource limits and ``PR_SET_DUMPABLE`` first (no core dump, no ``/proc/<pid>``
access by peers), then the environment is replaced, then Landlock, then seccomp last (so that the
set-up itself makes no forbidden call). Call it while the process has a single thread: Landlock
and seccomp bind the calling thread and the threads created after it.
"""

from __future__ import annotations

import ctypes
import glob
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

from worker.sandbox import landlock, syscalls

_PR_SET_DUMPABLE = 4
ENV_KEPT = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "CUDA_VISIBLE_DEVICES",
            "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "RECALIB_LOG_LEVEL")  # fmt: skip
SYSTEM_READ_ONLY = ("/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/localtime",
                    "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/sys/devices/system/cpu",
                    "/sys/fs/cgroup")  # fmt: skip
GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia[0-9]*",
               "/dev/nvidia-caps/*")  # fmt: skip
GPU_READ_ONLY = ("/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices")


@dataclass(frozen=True)
class JobConfinement:
    """What one job may touch: ``inputs`` read-only, ``out_dir`` and ``tmp_dir`` read-write;
    ``memory_bytes`` of address space, ``cpu_s`` of CPU time, ``file_bytes`` per written file
    (0: unbounded); ``gpu``: the NVIDIA device files are opened too."""

    inputs: tuple[str, ...]
    out_dir: str
    tmp_dir: str
    memory_bytes: int = 0
    cpu_s: int = 0
    file_bytes: int = 0
    gpu: bool = False
    code: tuple[str, ...] = field(default_factory=tuple)


def code_paths() -> tuple[str, ...]:
    """The Python installation and the project's packages (never the checkout around them)."""
    import recalib
    import worker

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    paths.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages", ".zip")))
    paths.update(os.path.dirname(package.__file__ or "") for package in (recalib, worker))
    return tuple(sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)}))


def enter(confinement: JobConfinement, level: str) -> int | None:
    """Confine this process for the job; returns the seccomp listener fd (None at ``off``).

    Raises:
        OSError: a mechanism refused (the job must not run).
    """
    _limit(resource.RLIMIT_AS, confinement.memory_bytes)
    _limit(resource.RLIMIT_CPU, confinement.cpu_s)
    _limit(resource.RLIMIT_FSIZE, confinement.file_bytes)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    kept = {k: os.environ[k] for k in ENV_KEPT if k in os.environ}
    os.environ.clear()
    os.environ.update(kept)
    os.environ.update(HOME=confinement.tmp_dir, TMPDIR=confinement.tmp_dir)
    if level == "off":
        return None
    read_only = [*(confinement.code or code_paths()), *SYSTEM_READ_ONLY, f"/proc/{os.getpid()}"]
    devices = ["/dev/null", "/dev/zero", "/dev/urandom"]
    if confinement.gpu:
        read_only += GPU_READ_ONLY
        devices += [p for pattern in GPU_DEVICES for p in glob.glob(pattern)]
    landlock.restrict_self(
        [Path(p) for p in read_only],
        [Path(confinement.out_dir), Path(confinement.tmp_dir)],
        data_read_only=[Path(p) for p in confinement.inputs],
        devices=[Path(p) for p in devices],
    )
    return syscalls.install_job_filter()


def _limit(which: int, value: int) -> None:
    if value > 0:
        resource.setrlimit(which, (value, value))
