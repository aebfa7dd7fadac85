"""Deployment files: compose validates against the Compose Specification, the Dockerfile lints clean
and keeps the properties the deployment relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")


def _stage(name: str) -> str:
    """The text of one build stage of the Dockerfile."""
    match = re.search(rf"^FROM .* AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S)
    assert match, f"no stage {name}"
    return match.group(1)


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} is a dev dependency (pip install -e '.[dev]')"
    return path


def test_compose_file_matches_the_compose_specification() -> None:
    result = subprocess.run(
        [
            _tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_image_has_no_torch_and_worker_image_has() -> None:
    assert "torch" not in _stage("api-deps").lower()
    assert "COPY --from=api-deps" in _stage("api")
    assert "COPY worker" not in _stage("api")  # the API never imports the worker package
    assert "TORCH_SPEC" in _stage("worker-deps")
    assert "COPY --from=worker-deps" in _stage("worker")


def test_worker_image_has_no_fastapi_and_no_service() -> None:
    assert "fastapi" not in _stage("worker-deps").lower()
    assert "FROM core-deps AS worker-deps" in DOCKERFILE  # not on top of the API's dependencies
    assert "COPY service" not in _stage("worker")
    assert "find_spec" in _stage("worker")  # the build itself fails if FastAPI or service/ is there


def test_images_run_as_non_root_with_api_healthcheck() -> None:
    assert re.search(r"^USER 10001", _stage("api"), re.M)
    assert re.search(r"^USER 10001", _stage("worker"), re.M)
    assert "HEALTHCHECK" in _stage("api")
    assert (
        DOCKERFILE.startswith("# syntax=")
        and "ARG BASE_IMAGE=python:3.11-slim-bookworm" in DOCKERFILE
    )


def test_dependencies_install_before_code_is_copied() -> None:
    for stage in ("api", "worker"):
        text = _stage(stage)
        assert text.index("COPY --from=") < text.index("COPY recalib"), stage


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def test_compose_services_wiring(compose: dict) -> None:
    services = compose["services"]
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia"
    assert gpu["capabilities"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    cpu_build = services["worker-cpu"]["build"]["args"]
    assert cpu_build["TORCH_SPEC"].endswith("+cpu")  # +cpu wheels are not on PyPI:
    assert "download.pytorch.org/whl/cpu" in cpu_build["TORCH_INDEX_URL"]
    assert "gpu" not in str(services["worker-cpu"].get("deploy", {}))
    for name in ("api", "worker", "worker-cpu"):
        assert "recalib-data:/data" in services[name]["volumes"]
        assert services[name]["init"] is True
    assert services["worker"]["stop_grace_period"] == "2m"


def test_compose_passes_every_setting(compose: dict) -> None:
    from recalib.settings import Settings

    env = compose["services"]["api"]["environment"]
    missing = {f"RECALIB_{n.upper()}" for n in Settings.model_fields} - set(env)
    assert missing <= {"RECALIB_HOST", "RECALIB_PORT"}, missing
