"""A real ``mlflow server`` for the tests: SQLite backend store, local artifact root, 127.0.0.1.

The server comes from the full ``mlflow`` package, which lives in a tool environment of its own
(``.venv-mlflow``, made by ``scripts/setup.sh dev``; ``RECALIB_MLFLOW_SERVER`` names another
``mlflow`` executable) so that its many dependencies stay out of recalib's. Without it the tests
skip, saying how to get it, unless ``RECALIB_REQUIRE_MLFLOW=1`` (CI) turns that into a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.live import REPO_ROOT, Proc, free_port, wait_until

STARTUP_S = 120.0


def mlflow_executable() -> str | None:
    named = os.environ.get("RECALIB_MLFLOW_SERVER")
    if named:
        return named
    tool = REPO_ROOT / ".venv-mlflow" / "bin" / "mlflow"
    return str(tool) if tool.exists() else shutil.which("mlflow")


def require_mlflow() -> str:
    """The ``mlflow`` executable and the client package, or skip (fail under CI's flag)."""
    executable = mlflow_executable()
    missing = []
    if executable is None:
        missing.append("an `mlflow` server (bash scripts/setup.sh dev makes .venv-mlflow)")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        missing.append("the client: pip install -e '.[mlflow]'")
    if missing:
        message = "MLflow tests need " + " and ".join(missing)
        if os.environ.get("RECALIB_REQUIRE_MLFLOW") == "1":
            pytest.fail(message)
        pytest.skip(message)
    assert executable is not None
    return executable


@contextmanager
def mlflow_server(work_dir: Path) -> Iterator[str]:
    """``mlflow server`` on a free port; yields its tracking URI; stops it (and its workers)."""
    executable = require_mlflow()
    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        executable, "server",
        "--backend-store-uri", f"sqlite:///{work_dir / 'mlflow.db'}",
        "--artifacts-destination", str(work_dir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    (work_dir / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(work_dir / "tmp")  # its database's init lock, else left in /tmp
    proc = Proc(cmd, env, work_dir / "mlflow.log")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if not proc.alive():
            pytest.fail(f"mlflow server exited:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, STARTUP_S, "the mlflow server's /health", every_s=0.5)
        yield url
    finally:
        proc.stop(timeout_s=10)
