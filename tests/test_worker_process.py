"""`recalib worker` misconfigured, with real processes, a real Valkey and real HTTP.

- no Redis where it points (or at the default): exits at once with one line naming the URL;
- a data directory that is not the API's: refuses to start, or fails the job, naming
  ``RECALIB_DATA_DIR`` and the path, never "deleted after RECALIB_RETENTION_S";
- Redis lost the worker's registry hash: the next beats write it whole again (device, pid, ...).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from recalib.settings import Settings
from tests.live import (
    FAST_ENV,
    REPO_ROOT,
    Stack,
    create_job,
    free_port,
    fresh_db_url,
    job_body,
    upload,
    wait_for_job,
    wait_until,
)

FINAL = {"succeeded", "failed", "cancelled"}
EXIT_WITHIN_S = 10.0


def _worker_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RECALIB_")}
    return base | FAST_ENV | {"PYTHONPATH": str(REPO_ROOT)} | env


def _run_worker(env: dict[str, str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "recalib.cli", "worker", "--name", "misconfigured"]
    try:
        return subprocess.run(
            cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stderr or b"")[-2000:]
        pytest.fail(f"the worker was still running after {timeout_s} s:\n{out!r}")


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("recalib: error:")]


def _something_listens(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- Redis -----------------------------------------------------------------------------------


def test_a_worker_exits_at_once_when_redis_does_not_answer(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = _worker_env(RECALIB_REDIS_URL=url, RECALIB_DATA_DIR=str(tmp_path))
    started = time.monotonic()
    result = _run_worker(env, tmp_path, timeout_s=60)
    took_s = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert took_s < EXIT_WITHIN_S, took_s
    [line] = _error_lines(result.stderr)
    assert f"Redis at {url} does not answer" in line
    assert "default" not in line


def test_a_worker_without_redis_url_says_the_default_was_used(tmp_path: Path) -> None:
    if _something_listens(6379):
        pytest.skip("something listens on 127.0.0.1:6379 here; the default would answer")
    env = _worker_env(RECALIB_DATA_DIR=str(tmp_path))
    result = _run_worker(env, tmp_path, timeout_s=60)
    assert result.returncode == 1, result.stderr
    [line] = _error_lines(result.stderr)
    assert "Redis at redis://127.0.0.1:6379/0 does not answer" in line
    assert "RECALIB_REDIS_URL is unset: the default was used" in line


@pytest.mark.parametrize(
    ("redis_url", "logged"),
    [
        ("redis://app:s3cret-pw@127.0.0.1:6390/3", "redis://app:***@127.0.0.1:6390/3 (RECALIB_"),
        (None, "redis://127.0.0.1:6379/0 (default; RECALIB_REDIS_URL is unset)"),
    ],
)
def test_the_api_logs_which_redis_it_uses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, redis_url: str | None, logged: str
) -> None:
    from service.main import create_app

    with caplog.at_level(logging.INFO, logger="recalib.jobs.connection"):
        create_app(Settings(redis_url=redis_url, data_dir=tmp_path))  # type: ignore[arg-type]
    messages = [r.getMessage() for r in caplog.records if r.name == "recalib.jobs.connection"]
    assert any(f"Redis at {logged}" in m for m in messages), messages
    assert not any("s3cret-pw" in m for m in messages), messages


# -- the data directory ----------------------------------------------------------------------


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    """An API (data in ``tmp_path/data``) on a database of its own; workers per test."""
    url = fresh_db_url(redis_url)
    redis.Redis.from_url(url).flushdb()
    with Stack(url, tmp_path) as stack:
        yield stack
    redis.Redis.from_url(url).flushdb()


@pytest.mark.slow
def test_a_worker_without_data_dir_refuses_to_start_naming_the_setting(
    stack: Stack, tmp_path: Path
) -> None:
    """The API has its data in ``tmp/data``; the worker, RECALIB_DATA_DIR unset, would use
    ``./recalib-data`` (here: an empty directory elsewhere)."""
    stack.start_api()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _worker_env(RECALIB_REDIS_URL=stack.redis_url, RECALIB_WORKER_DEVICE="cpu")
    started = time.monotonic()
    result = _run_worker(env, elsewhere, timeout_s=90)
    assert result.returncode != 0, result.stderr
    assert time.monotonic() - started < 60
    [line] = _error_lines(result.stderr)
    assert "RECALIB_DATA_DIR" in line and str(elsewhere / "recalib-data") in line, line
    assert "unset" in line and str(stack.data_dir) in line, line
    assert "retention" not in result.stderr.lower()
    assert not (elsewhere / "recalib-data").exists()  # it created nothing there


def _assert_job_fails_naming_the_data_dir(
    stack: Stack, digits_files: dict[str, Path], data_dir: Path
) -> None:
    """A digits job through ``stack`` fails naming RECALIB_DATA_DIR and the worker's ``data_dir``
    (never retention)."""
    with stack.client() as client:
        ids = {name: upload(client, path) for name, path in digits_files.items()}
        job = wait_for_job(client, create_job(client, job_body(ids))["id"], FINAL, timeout_s=120)
    assert job["status"] == "failed", job
    message = job["error"]["message"]
    assert "RECALIB_DATA_DIR" in message and str(data_dir) in message, message
    assert "retention" not in message.lower(), message


@pytest.mark.slow
def test_a_job_on_a_worker_started_before_the_api_with_another_data_dir_fails_naming_the_setting(
    stack: Stack, tmp_path: Path, digits_files: dict[str, Path]
) -> None:
    """Worker and API start together (compose): the worker cannot compare yet; the job can."""
    other = tmp_path / "other-data"
    other.mkdir()
    stack.start_worker("wrong-dir", wait=False, RECALIB_DATA_DIR=str(other))
    stack.start_api()
    wait_until(lambda: "wrong-dir" in _listed(stack), 120, "the worker to register")
    _assert_job_fails_naming_the_data_dir(stack, digits_files, other)


@pytest.mark.slow
def test_a_job_fails_naming_the_setting_when_redis_lost_which_data_dir_the_api_uses(
    stack: Stack, tmp_path: Path, digits_files: dict[str, Path]
) -> None:
    """Without the API's mark in Redis, a data directory with no ``files/`` is still wrong."""
    from recalib.keys import DATA_DIR_KEY

    stack.start_api()
    stack.conn.delete(DATA_DIR_KEY)
    other = tmp_path / "other-data"
    other.mkdir()
    stack.start_worker("no-files", RECALIB_DATA_DIR=str(other))
    _assert_job_fails_naming_the_data_dir(stack, digits_files, other)


# -- the registry ----------------------------------------------------------------------------


def _listed(stack: Stack) -> dict[str, dict[str, object]]:
    try:
        workers = httpx.get(f"{stack.url}/readyz", timeout=5).json()["workers"]
    except httpx.TransportError:
        return {}
    return {str(w["name"]): w for w in workers}


@pytest.mark.slow
def test_the_registry_hash_is_written_whole_again_after_redis_lost_it(stack: Stack) -> None:
    """FLUSHDB (a Redis restarted without persistence): the device is not ``unknown`` after."""
    stack.start_api()
    proc = stack.start_worker("w5")
    assert _listed(stack)["w5"]["device"] == "cpu"
    stack.conn.flushdb()
    wait_until(lambda: "w5" in _listed(stack), 10, "the worker to beat again")
    time.sleep(3 * 1.0)  # a few more beats (RECALIB_WORKER_HEARTBEAT_S=1)
    listed = _listed(stack)["w5"]
    assert listed["device"] == "cpu", listed
    raw = stack.conn.hgetall("recalib:worker:w5")
    assert int(raw[b"pid"]) == proc.pid
    assert raw[b"hostname"].decode() == socket.gethostname()
    metrics = httpx.get(f"{stack.url}/metrics", timeout=5).text
    assert 'device="unknown"' not in metrics
