"""The multi-host compose recipe (deploy/): a control host (Redis with AOF, the API, an
S3-compatible store) and GPU hosts (workers only) that share no volume; both files validate
against the Compose Specification and pass every setting. The same topology runs for real in
tests/test_s3_end_to_end.py (processes) and scripts/container-smoke.sh (containers)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recalib.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CONTROL = ROOT / "deploy" / "compose.control.yml"
GPU = ROOT / "deploy" / "compose.gpu.yml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [CONTROL, GPU], ids=["control", "gpu"])
def test_each_file_matches_the_compose_specification(path: Path) -> None:
    tool = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("path", "service"), [(CONTROL, "api"), (GPU, "worker")])
def test_each_file_passes_every_setting_and_the_credentials_by_environment(
    path: Path, service: str
) -> None:
    env = _load(path)["services"][service]["environment"]
    missing = {f"RECALIB_{n.upper()}" for n in Settings.model_fields} - set(env)
    assert missing <= {"RECALIB_HOST", "RECALIB_PORT"}, missing
    assert env["RECALIB_STORAGE_URL"].startswith("${RECALIB_STORAGE_URL:-s3://")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert re.fullmatch(rf"\$\{{{name}:\?.+\}}", env[name]), env[name]  # required, not given
    assert ":?set RECALIB_REDIS_PASSWORD" in env["RECALIB_REDIS_URL"]


def test_the_control_host_runs_redis_with_aof_the_api_and_the_store() -> None:
    services = _load(CONTROL)["services"]
    assert set(services) == {"redis", "api", "seaweedfs"}
    command = services["redis"]["command"]
    assert "--appendonly" in command and "--requirepass" in command
    assert services["seaweedfs"]["command"][0] == "mini"
    assert "8333:8333" in services["seaweedfs"]["ports"]
    api_env = services["api"]["environment"]
    assert "seaweedfs:8333" in api_env["RECALIB_S3_ENDPOINT_URL"]
    assert "RECALIB_PUBLIC_HOST" in api_env["RECALIB_S3_PUBLIC_ENDPOINT_URL"]
    assert "volumes" not in services["api"]  # the API keeps nothing on disk


def test_gpu_hosts_run_workers_only_sharing_no_volume_with_the_control_host() -> None:
    gpu, control = _load(GPU), _load(CONTROL)
    assert set(gpu["services"]) == {"worker"}
    worker = gpu["services"]["worker"]
    shared = set(gpu.get("volumes", {})) & set(control.get("volumes", {}))
    assert not shared, shared
    assert worker["volumes"] == ["worker-scratch:/data"]  # its own scratch and input cache
    env = worker["environment"]
    assert "@${RECALIB_CONTROL_HOST:?" in env["RECALIB_REDIS_URL"]
    assert "${RECALIB_CONTROL_HOST:?" in env["RECALIB_S3_ENDPOINT_URL"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert worker["init"] is True and worker["stop_grace_period"] == "2m"
