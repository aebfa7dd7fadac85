"""Watching a job of a live stack (:mod:`tests.live`) and the processes that run it, for the
fault tests: its phase, its events, its worker, the worker's warm runners."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from recalib.jobs.records import load
from tests.live import Stack, create_job, session_pids, wait_until


def running_in(client: httpx.Client, job_id: str, phase: str, timeout_s: float = 90) -> None:
    """Wait until the job runs in ``phase`` (it must stay queued or running meanwhile)."""

    def reached() -> bool:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        return bool(job["status"] == "running" and job["progress"]["phase"] == phase)

    wait_until(reached, timeout_s, f"job {job_id} to be {phase}")


def start_recalibrating(
    client: httpx.Client, stack: Stack, body: dict[str, Any]
) -> tuple[str, str]:
    """Create a job from ``body`` and wait until it recalibrates: its id, its worker's name."""
    job_id = create_job(client, body)["id"]
    running_in(client, job_id, "recalibrating")
    return job_id, worker_of(stack, job_id)


def event_at(
    client: httpx.Client,
    job_id: str,
    after: int,
    is_it: Callable[[dict[str, Any]], bool],
    what: str,
    timeout_s: float,
) -> float:
    """Wait until the job has an event past ``after`` for which ``is_it``; the monotonic time."""

    def seen() -> bool:
        events = client.get(f"/v1/jobs/{job_id}/events", params={"after": after}).json()
        return any(is_it(event) for event in events)

    wait_until(seen, timeout_s, what, every_s=0.05)
    return time.monotonic()


def left_running_at(client: httpx.Client, job_id: str, after: int) -> float:
    """Wait until the job has an event past ``after`` that is not `running`; its monotonic time."""
    not_running = lambda event: event["status"] != "running"  # noqa: E731
    return event_at(client, job_id, after, not_running, f"job {job_id} to leave running", 60)


def worker_of(stack: Stack, job_id: str) -> str:
    """The name of the worker the job's record names (it must name one)."""
    stored = load(stack.conn, job_id)
    assert stored is not None and stored.record.worker is not None
    return stored.record.worker


def parent_pid(pid: int) -> int:
    """The parent of process ``pid``, from /proc; -1 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def job_pids(runner_pid: int) -> list[int]:
    """The job processes a runner forked (at most one at a time)."""
    try:
        children = Path(f"/proc/{runner_pid}/task/{runner_pid}/children").read_text().split()
    except OSError:
        return []
    return [int(pid) for pid in children]


def runner_pids(worker_pid: int) -> list[int]:
    """The warm runner(s) of a worker: its children running ``worker.runner.warm`` (not their
    own children, the DataLoader processes, which share that command line)."""
    pids = []
    for pid in session_pids(worker_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.runner.warm" in cmdline and parent_pid(pid) == worker_pid:
            pids.append(pid)
    return pids
