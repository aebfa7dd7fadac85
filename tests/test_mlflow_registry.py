"""The MLflow Model Registry round trip against a real ``mlflow server`` (SQLite, local artifacts):
a registered digits model goes in by ``models:/`` URI (version and alias), is recalibrated by the
real pipeline, and comes out as a new version with its metrics, lineage tags and, unless the
verdict is worse, the alias."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from recalib.contract import JobOptions, JobSpec, Verdict
from recalib.errors import InvalidOptionError, NotFoundError, ServiceUnavailableError
from recalib.registry.models import (
    check_configured,
    fetch_models,
    parse_models_uri,
    register_result,
    resolve_model_uri,
)
from recalib.settings import get_settings
from tests.bn_oracle import digits_net
from tests.live import Stack, create_job, free_port, upload, wait_for_job
from tests.mlflow_server import mlflow_server

NAME = "digits-cnn"
FINAL = {"succeeded", "failed", "cancelled"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@pytest.fixture(scope="module")
def source_version(client, digits_files: dict[str, Path]) -> str:
    """The source digits model registered as a version of NAME (alias ``champion``), the way a
    training pipeline would: logged to a run, registered from the run's artifacts."""
    experiment_id = client.create_experiment("training")
    run = client.create_run(experiment_id)
    client.log_artifact(run.info.run_id, str(digits_files["model"]), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(NAME)
    version = client.create_model_version(
        NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias(NAME, "champion", version.version)
    return str(version.version)


@pytest.fixture
def registry_env(monkeypatch: pytest.MonkeyPatch, tracking_uri: str) -> Iterator[None]:
    """RECALIB_MLFLOW_TRACKING_URI for the pipeline's settings (cached: cleared around)."""
    monkeypatch.setenv("RECALIB_MLFLOW_TRACKING_URI", tracking_uri)
    get_settings.cache_clear()
    try:
        yield
    finally:
        get_settings.cache_clear()


def test_models_uris_parse_and_bad_ones_name_the_field() -> None:
    assert parse_models_uri("models:/m/3").version == "3"
    assert parse_models_uri("models:/m@prod").alias == "prod"
    for bad in ("models:/m", "models:/m/latest", "models:/m/3/x", "models:m/3", "runs:/abc/m"):
        with pytest.raises(InvalidOptionError, match="model_uri"):
            parse_models_uri(bad)
    with pytest.raises(InvalidOptionError, match="RECALIB_MLFLOW_TRACKING_URI") as info:
        check_configured("", "options.register")
    assert info.value.field == "options.register"


@pytest.mark.slow
def test_a_version_goes_in_by_version_and_by_alias(
    tracking_uri: str, source_version: str, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    by_version = resolve_model_uri(f"models:/{NAME}/{source_version}", tmp_path / "v", tracking_uri)
    by_alias = resolve_model_uri(f"models:/{NAME}@champion", tmp_path / "a", tracking_uri)
    for resolved in (by_version, by_alias):
        assert resolved.path.name == "digits.pt2"  # the suffix tells the loader the format
        assert _sha256(resolved.path) == _sha256(digits_files["model"])
        assert resolved.uri == f"models:/{NAME}/{source_version}"

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        def write(self, chunk: bytes) -> None:
            self.data += chunk

    sink = Sink()
    name, validator = fetch_models(f"models:/{NAME}@champion", "model_uri", sink, tracking_uri)
    assert (name, validator) == ("digits.pt2", f"{NAME}/{source_version}")
    assert hashlib.sha256(sink.data).hexdigest() == _sha256(digits_files["model"])


@pytest.mark.slow
def test_missing_versions_aliases_and_a_down_registry_are_clear_errors(
    tracking_uri: str, source_version: str, tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError, match=r"model_uri: looking up models:/digits-cnn/99"):
        resolve_model_uri(f"models:/{NAME}/99", tmp_path, tracking_uri)
    with pytest.raises(NotFoundError, match="alias nope"):
        resolve_model_uri(f"models:/{NAME}@nope", tmp_path, tracking_uri)
    with pytest.raises(NotFoundError, match="no-such-model"):
        resolve_model_uri("models:/no-such-model/1", tmp_path, tracking_uri)
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailableError, match="MLflow registry"):
        resolve_model_uri(f"models:/{NAME}/1", tmp_path, down)


@pytest.mark.slow
@pytest.mark.usefixtures("registry_env")
def test_recalibrated_model_comes_out_as_a_new_version_with_metrics_and_tags(
    client,
    tracking_uri: str,
    source_version: str,
    digits_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    from recalib.settings import Settings
    from worker.runner.sandboxed import run_spec  # the model sandboxed, registered outside it

    resolved = resolve_model_uri(f"models:/{NAME}@champion", tmp_path / "in", tracking_uri)
    spec = JobSpec(
        model_path=str(resolved.path),
        calibration_path=str(digits_files["calibration"]),
        eval_path=str(digits_files["evaluation"]),
        options=JobOptions(register=f"{NAME}@champion", device="cpu"),  # type: ignore[arg-type]
        out_dir=str(tmp_path / "out"),
        model_source=resolved.uri,
    )
    report = run_spec(spec, Settings())
    registered = report.registered
    assert registered is not None
    assert registered.name == NAME
    assert int(registered.version) == int(source_version) + 1
    on_disk = (tmp_path / "out" / "report.json").read_text()
    assert f'"version": "{registered.version}"' in on_disk  # report.json says so too

    version = client.get_model_version(NAME, registered.version)
    tags = version.tags
    assert tags["recalib.source_model"] == NAME
    assert tags["recalib.source_version"] == source_version
    assert tags["recalib.calibration_sha256"] == _sha256(digits_files["calibration"])
    assert tags["recalib.estimator"] == "population"
    assert tags["recalib.verdict"] == report.verdict.value
    assert tags["recalib.version"] == report.recalib_version
    assert report.before is not None and report.after is not None
    assert float(tags["recalib.before_top1"]) == pytest.approx(report.before.top1, abs=1e-5)
    assert float(tags["recalib.after_top1"]) == pytest.approx(report.after.top1, abs=1e-5)
    metrics = client.get_run(registered.run_id).data.metrics
    assert metrics["after_top1"] == pytest.approx(report.after.top1)
    assert metrics["before_top1"] == pytest.approx(report.before.top1)

    champion = client.get_model_version_by_alias(NAME, "champion").version
    moved = report.verdict != Verdict.worse
    assert registered.alias_moved is moved
    assert champion == (registered.version if moved else source_version)

    # The new version round-trips: it is the job's checkpoint, with the new statistics.
    out = resolve_model_uri(f"models:/{NAME}/{registered.version}", tmp_path / "o", tracking_uri)
    assert _sha256(out.path) == report.checkpoint.sha256
    new_mean = digits_net(out.path).features[1].running_mean
    old_mean = digits_net(digits_files["model"]).features[1].running_mean
    assert not torch.allclose(new_mean, old_mean)


@pytest.mark.slow
@pytest.mark.usefixtures("registry_env")
def test_the_alias_stays_when_the_verdict_is_worse(
    client, tracking_uri: str, source_version: str, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    from worker.pipeline import run_job

    spec = JobSpec(
        model_path=str(digits_files["model"]),
        calibration_path=str(digits_files["calibration"]),
        eval_path=str(digits_files["evaluation"]),
        options=JobOptions(device="cpu"),
        out_dir=str(tmp_path / "out"),
    )
    report = run_job(spec)
    before = client.get_model_version_by_alias(NAME, "champion").version
    worse = report.model_copy(update={"verdict": Verdict.worse})
    register = JobOptions(register=f"{NAME}@champion").register  # type: ignore[arg-type]
    assert register is not None
    registered = register_result(register, worse, tmp_path / "out", tracking_uri)
    assert registered.alias_moved is False
    assert client.get_model_version_by_alias(NAME, "champion").version == before
    assert client.get_model_version(NAME, registered.version).tags["recalib.verdict"] == "worse"


def test_register_on_a_server_without_a_registry_is_refused_at_create(
    live_redis_url: str, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    from tests.live import ApiThread, make_settings, upload

    settings = make_settings(tmp_path, live_redis_url, mlflow_tracking_uri="")
    with ApiThread(settings) as api, api.client() as client:
        ids = {name: upload(client, path) for name, path in digits_files.items()}
        body = {
            "model_file": ids["model"],
            "calibration_file": ids["calibration"],
            "options": {"register": {"name": NAME, "alias": "champion"}},
        }
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "options.register"
        assert "RECALIB_MLFLOW_TRACKING_URI" in response.json()["detail"]
        assert client.get("/v1/jobs").json()["items"] == []


@pytest.mark.slow
def test_a_job_takes_its_model_by_models_uri_through_the_service(
    client,
    tracking_uri: str,
    source_version: str,
    digits_files: dict[str, Path],
    live_redis_url: str,
    tmp_path: Path,
) -> None:
    """API + worker: ``model_uri: models:/<name>@<alias>`` is fetched by the worker (the file's
    own name tells the format), recorded with its sha256, and the output version's lineage tags
    name the version the alias pointed at."""
    client.set_registered_model_alias(NAME, "site-a", source_version)
    env = {"RECALIB_MLFLOW_TRACKING_URI": tracking_uri}
    with Stack(live_redis_url, tmp_path, **env) as stack:
        stack.start_api()
        stack.start_worker("w1")
        with stack.client() as http:
            body = {
                "model_uri": f"models:/{NAME}@site-a",
                "calibration_file": upload(http, digits_files["calibration"]),
                "eval_file": upload(http, digits_files["evaluation"]),
                "options": {"register": {"name": "digits-site-a"}},
            }
            done = wait_for_job(http, create_job(http, body)["id"], FINAL, timeout_s=240)
    assert done["status"] == "succeeded", done["error"]
    report = done["result"]
    model = next(s for s in report["data"]["sources"] if s["role"] == "model")
    assert model["uri"] == f"models:/{NAME}@site-a"
    assert model["sha256"] == _sha256(digits_files["model"])
    assert report["checkpoint"]["format"] == "pt2"
    tags = client.get_model_version("digits-site-a", report["registered"]["version"]).tags
    assert tags["recalib.source_model"] == NAME
    assert tags["recalib.source_version"] == source_version
