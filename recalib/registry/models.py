"""The MLflow Model Registry, both ways (optional extra ``recalib[mlflow]``: ``mlflow-skinny``).

- **in**: :func:`resolve_model_uri` turns ``models:/<name>/<version>`` or ``models:/<name>@<alias>``
  into the registered version's model file (``.pt2``, TorchScript, or a state_dict for ``arch``)
  in a directory of the caller's; :func:`fetch_models` is the same as a ``models`` fetcher.
- **out**: :func:`register_result` logs a recalibrated model (its checkpoint and ``report.json``,
  the before/after metrics) to an MLflow run and registers it as a new version of
  ``options.register.name``, tagged with its lineage; ``options.register.alias`` moves to it
  only when the verdict is not ``worse``.

The registry is the operator's: ``RECALIB_MLFLOW_TRACKING_URI`` (never a job field). The client,
its bounded retries and what MLflow's errors mean are in :mod:`recalib.registry.client`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recalib import __version__
from recalib.checksums import sha256_of
from recalib.contract.options import JobSpec, Register
from recalib.contract.report import RegisteredModel, Report
from recalib.errors import InternalError, InvalidModelError, InvalidOptionError
from recalib.registry.client import (
    MODELS_URI_RE,
    SCHEME,
    check_configured,
    parse_models_uri,
    registry_client,
    reraise,
)
from recalib.verdict import alias_may_move

__all__ = [  # with the client's two checks, which callers import from here
    "EXPERIMENT",
    "MODEL_SUFFIXES",
    "ResolvedModel",
    "check_configured",
    "fetch_models",
    "metrics_of",
    "parse_models_uri",
    "register_job_output",
    "register_result",
    "registry_tags",
    "resolve_model_uri",
]

logger = logging.getLogger(__name__)

EXPERIMENT = "recalib"
MODEL_SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".safetensors", ".onnx")
"""Files a registered version may hold for recalib: a .pt2 program, TorchScript, a state_dict."""


@dataclass(frozen=True)
class ResolvedModel:
    """A registered version's model file, where :func:`resolve_model_uri` put it."""

    path: Path
    name: str
    version: str
    run_id: str | None

    @property
    def uri(self) -> str:
        """The version's own URI (an alias resolved): what lineage tags record."""
        return f"{SCHEME}:/{self.name}/{self.version}"


# -- in -------------------------------------------------------------------------------------


def resolve_model_uri(
    uri: str, dest_dir: Path, tracking_uri: str, *, field: str = "model_uri"
) -> ResolvedModel:
    """Download the model file of the version ``uri`` names into ``dest_dir``.

    The version's artifacts must hold exactly one file ending in one of :data:`MODEL_SUFFIXES`
    (an MLflow ``pytorch`` flavor's ``data/model.pth`` counts: a pickled module, which loads only
    under RECALIB_ALLOW_UNSAFE_PICKLE). Raises :class:`NotFoundError` for an unknown model,
    version or alias, :class:`InvalidModelError` for artifacts without one model file, and
    :class:`ServiceUnavailableError` when the registry cannot be reached.
    """
    ref = parse_models_uri(uri, field)
    with registry_client(tracking_uri, field) as client:
        try:
            if ref.alias is not None:
                found = client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                found = client.get_model_version(ref.name, ref.version)
            download_uri = client.get_model_version_download_uri(ref.name, found.version)
        except Exception as exc:
            reraise(exc, f"looking up {uri}", field, tracking_uri)
        from mlflow.artifacts import download_artifacts

        with tempfile.TemporaryDirectory(prefix="recalib-mlflow-") as tmp:
            try:
                local = Path(
                    download_artifacts(download_uri, dst_path=tmp, tracking_uri=tracking_uri)
                )
            except Exception as exc:
                reraise(exc, f"downloading {uri}", field, tracking_uri)
            model_file = _model_file(local, uri, field)
            dest_dir.mkdir(parents=True, exist_ok=True)
            target = dest_dir / model_file.name
            shutil.move(str(model_file), target)
    logger.info("%s is %s version %s: %s", uri, ref.name, found.version, target.name)
    return ResolvedModel(target, ref.name, str(found.version), getattr(found, "run_id", None))


def _model_file(local: Path, uri: str, field: str) -> Path:
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    models = [p for p in files if p.suffix.lower() in MODEL_SUFFIXES]
    if len(models) == 1:
        return models[0]
    names = [str(p.relative_to(local)) if p != local else p.name for p in (models or files)][:10]
    what = "several model files" if models else "no model file"
    raise InvalidModelError(
        f"{field}: {uri} holds {what} ({', '.join(names) or 'nothing'}); recalib needs exactly "
        f"one of {', '.join(MODEL_SUFFIXES)} among the version's artifacts",
        field=field,
    )


def fetch_models(uri: str, field: str, sink: Any, tracking_uri: str) -> tuple[str, str]:
    """``uri`` written into ``sink`` (anything with ``write(bytes)``); returns the file's name
    (its suffix tells the format) and a validator that changes with the version an alias names.

    For a scheme table of fetchers: ``models:/<name>/<version>`` names an immutable version, so
    ``<name>/<version>`` identifies the content.
    """
    with tempfile.TemporaryDirectory(prefix="recalib-models-") as tmp:
        resolved = resolve_model_uri(uri, Path(tmp), tracking_uri, field=field)
        with resolved.path.open("rb") as fh:
            while chunk := fh.read(1024 * 1024):
                sink.write(chunk)
    return resolved.path.name, f"{resolved.name}/{resolved.version}"


# -- out ------------------------------------------------------------------------------------


def registry_tags(
    report: Report, source: str | None, calibration_sha256: str | None
) -> dict[str, str]:
    """The lineage and quality tags of a registered recalibrated version."""
    if report.checkpoint is None:  # a drift job: JobCreate/JobSpec refuse register for it
        raise InternalError("a report without a checkpoint cannot be registered")
    tags = {
        "recalib.version": __version__,
        "recalib.estimator": report.calibration.estimator.value,
        "recalib.verdict": report.verdict.value,
        "recalib.calibration_samples": str(report.calibration.samples),
        "recalib.checkpoint_sha256": report.checkpoint.sha256,
    }
    if calibration_sha256:
        tags["recalib.calibration_sha256"] = calibration_sha256
    if source:
        tags["recalib.source"] = source
        if (match := MODELS_URI_RE.match(source)) and match["version"]:
            tags["recalib.source_model"] = match["name"]
            tags["recalib.source_version"] = match["version"]
    for key, value in metrics_of(report).items():
        tags[f"recalib.{key}"] = f"{value:.6g}"
    return tags


def metrics_of(report: Report) -> dict[str, float]:
    """``before_<metric>`` and ``after_<metric>`` for every number the evaluations have."""
    metrics: dict[str, float] = {}
    for when, evaluation in (("before", report.before), ("after", report.after)):
        if evaluation is None:
            continue
        for key, value in evaluation.model_dump().items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"{when}_{key}"] = float(value)
    if report.prediction_change is not None:
        metrics["prediction_change"] = report.prediction_change
    return metrics


def register_result(
    register: Register,
    report: Report,
    out_dir: Path,
    tracking_uri: str,
    *,
    source: str | None = None,
    calibration_sha256: str | None = None,
    field: str = "options.register",
) -> RegisteredModel:
    """Register ``out_dir``'s checkpoint as a new version of ``register.name`` (created when
    missing), with :func:`registry_tags`; move ``register.alias`` unless the verdict is worse."""
    if report.checkpoint is None:  # a drift job: JobCreate/JobSpec refuse register for it
        raise InternalError("a report without a checkpoint cannot be registered")
    checkpoint = out_dir / report.checkpoint.file
    with registry_client(tracking_uri, field) as client:
        try:
            experiment = client.get_experiment_by_name(EXPERIMENT)
            experiment_id = (
                experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
            )
            run = client.create_run(
                experiment_id, tags={"recalib.source": source} if source else None
            )
            run_id = run.info.run_id
            client.log_artifact(run_id, str(checkpoint), artifact_path="model")
            if (out_dir / "report.json").is_file():
                client.log_artifact(run_id, str(out_dir / "report.json"))
            for key, value in metrics_of(report).items():
                client.log_metric(run_id, key, value)
            client.set_terminated(run_id)
            _ensure_registered_model(client, register.name)
            version = client.create_model_version(
                register.name,
                source=f"{run.info.artifact_uri}/model",
                run_id=run_id,
                tags=registry_tags(report, source, calibration_sha256),
                description=f"recalibrated by recalib {__version__} (verdict: {report.verdict})",
            )
            moved = register.alias is not None and alias_may_move(report.verdict)
            if moved:
                client.set_registered_model_alias(register.name, register.alias, version.version)
        except Exception as exc:
            reraise(exc, f"registering {register.name}", field, tracking_uri)
    logger.info("registered %s version %s%s", register.name, version.version,
                f" (alias {register.alias} moved)" if moved else "")  # fmt: skip
    return RegisteredModel(
        name=register.name,
        version=str(version.version),
        run_id=run_id,
        alias=register.alias,
        alias_moved=moved,
    )


def _ensure_registered_model(client: Any, name: str) -> None:
    try:
        client.create_registered_model(name)
    except Exception as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise


def register_job_output(
    spec: JobSpec, report: Report, out_dir: Path, tracking_uri: str
) -> RegisteredModel:
    """What a run does for ``spec.options.register`` (set): its output as a new model version,
    tagged with the model's source and the calibration file's sha256."""
    if spec.options.register is None:
        raise InvalidOptionError("options.register is not set", field="options.register")
    return register_result(
        spec.options.register,
        report,
        out_dir,
        tracking_uri,
        source=spec.model_source,
        calibration_sha256=_sha256_file(Path(spec.calibration_path)),
    )


def _sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None  # an extracted archive directory, say: no single file to hash
    return sha256_of(path)
