"""The sandbox's mechanisms on this kernel (Landlock, seccomp, network namespace) and the levels'
fail-closed check, with real processes: a forked child confined for a job, and ``recalib worker``
started under a seccomp filter that takes a mechanism away, as a kernel or container without it
would."""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live import REPO_ROOT
from worker.sandbox import confine, levels, syscalls
from worker.sandbox.confine import JobConfinement


def _in_confined_child(tmp_path: Path, attempt: str) -> tuple[str, list[str]]:
    """Run ``attempt`` (Python source) in a forked child confined to ``tmp_path``'s job dirs;
    (what the child reported, the forbidden calls its listener saw)."""
    inputs, out, scratch = (tmp_path / d for d in ("in", "out", "tmp"))
    for d in (inputs, out, scratch):
        d.mkdir(exist_ok=True)
    (inputs / "data.bin").write_bytes(b"input")
    report_r, report_w = os.pipe()
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        os.close(report_r)
        try:
            fd = confine.enter(
                JobConfinement(inputs=(str(inputs),), out_dir=str(out), tmp_dir=str(scratch)),
                "strict",
            )
            assert fd is not None
            socket.send_fds(theirs, [b"l"], [fd])
            try:
                exec(attempt)
                said = "allowed"
            except OSError as exc:
                said = f"denied errno {exc.errno}"
        except BaseException as exc:
            said = f"setup failed: {exc!r}"
        os.write(report_w, said.encode())
        os._exit(0)
    os.close(report_w)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 8, 1)
    listener = syscalls.Listener(fds[0])
    pidfd = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([listener.fd, pidfd], [], [], 30)
        assert ready, "the confined child hung"
        if listener.fd in ready:
            listener.handle()
        if pidfd in ready:
            break
    os.waitpid(pid, 0)
    with os.fdopen(report_r, "rb") as answer:
        said = answer.read().decode()
    listener.close()
    os.close(pidfd)
    return said, [a.describe() for a in listener.attempts]


NO_ACCESS, REFUSED = f"denied errno {errno.EACCES}", f"denied errno {errno.EPERM}"


@pytest.mark.parametrize(
    ("attempt", "expected", "seen"),
    [
        ("open(str(tmp_path / 'in' / 'data.bin'), 'rb').read()", "allowed", []),
        ("open(str(tmp_path / 'out' / 'x'), 'w').write('x')", "allowed", []),
        ("open(str(tmp_path / 'in' / 'data.bin'), 'ab').write(b'x')", NO_ACCESS, []),
        ("open('/etc/hostname', 'rb').read()", NO_ACCESS, []),
        ("open('/proc/1/environ', 'rb').read()", NO_ACCESS, []),
        ("os.symlink('/etc/hostname', str(tmp_path / 'out' / 'l'))", NO_ACCESS, []),
        ("socket.socket()", REFUSED, ["opening a socket (AF_INET)"]),
        ("socket.socket(socket.AF_UNIX)", REFUSED, ["opening a socket (AF_UNIX)"]),
        ("os.fork()", REFUSED, ["starting a process (fork)"]),
        ("os.execv('/bin/true', ['true'])", REFUSED, ["running a program (execve)"]),
        ("os.kill(1, 0)", REFUSED, []),  # Landlock's signal scope
    ],
)  # fmt: skip
def test_a_confined_process_reaches_only_its_job(tmp_path, attempt, expected, seen) -> None:
    said, attempts = _in_confined_child(tmp_path, attempt)
    assert said == expected
    assert attempts == seen


@pytest.mark.parametrize(
    ("attempt", "seen"),
    [
        ("socket.socket()", ["opening a socket (AF_INET)"]),
        ("os.fork()", ["starting a process (fork)"]),
    ],
)
def test_a_filter_built_ahead_by_the_parent_confines_every_child(
    tmp_path, monkeypatch, attempt, seen
) -> None:
    """The runner builds the filter once (prepare_job_filter); each forked job loads its copy."""
    monkeypatch.setattr(syscalls, "_prepared_filter", None)  # restored after the test
    syscalls.prepare_job_filter()
    assert syscalls._prepared_filter is not None
    for _ in range(2):
        assert _in_confined_child(tmp_path, attempt) == (REFUSED, seen)


def test_a_confined_process_keeps_no_secret_of_its_parent(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-jobs")
    said, _ = _in_confined_child(
        tmp_path, "assert 'AWS_SECRET_ACCESS_KEY' not in os.environ, 'leaked'"
    )
    assert said == "allowed"


def test_the_strict_level_is_available_here() -> None:
    status = levels.check("strict")
    assert status.level == "strict"
    assert status.mechanisms[0].startswith("landlock-abi") and status.mechanisms[1:] == (
        "seccomp",
        "netns",
    )


WITHOUT = """
import os, sys, errno, pyseccomp as sc
f = sc.SyscallFilter(sc.ALLOW)
for name in sys.argv[1].split(","):
    f.add_rule(sc.ERRNO(errno.ENOSYS if name.startswith("landlock") else errno.EPERM), name)
f.load()  # inherited across execve: the worker starts on a kernel without these calls
os.execv(sys.executable, [sys.executable, "-m", "recalib.cli", "worker", "--burst"])
"""


def _worker_without(syscalls_taken: str, level: str, redis_url: str, tmp_path: Path):
    env = os.environ | {
        "PYTHONPATH": str(REPO_ROOT),
        "RECALIB_SANDBOX": level,
        "RECALIB_REDIS_URL": redis_url,
        "RECALIB_DATA_DIR": str(tmp_path),
        "RECALIB_WORKER_DEVICE": "cpu",
    }
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, syscalls_taken],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("taken", "level", "names"),
    [
        ("landlock_create_ruleset", "strict", "Landlock"),
        ("landlock_create_ruleset", "basic", "Landlock"),
        ("seccomp", "basic", "seccomp"),
        ("unshare", "strict", "network namespace"),
    ],
)
def test_a_worker_refuses_to_start_without_its_levels_mechanism(
    taken, level, names, redis_url, tmp_path
) -> None:
    done = _worker_without(taken, level, redis_url, tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("recalib: error: ") and names in lines[0]
    assert f"RECALIB_SANDBOX={level}" in lines[0] and "RECALIB_SANDBOX=" in lines[0]


@pytest.mark.parametrize(("taken", "level"), [("unshare", "basic"), ("seccomp,unshare", "off")])
def test_a_weaker_level_set_explicitly_starts(taken, level, redis_url, tmp_path) -> None:
    done = _worker_without(taken, level, redis_url, tmp_path)
    assert done.returncode == 0, done.stderr  # --burst on an empty queue: started, then done
