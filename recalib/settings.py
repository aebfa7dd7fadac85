"""All configuration, from environment variables prefixed ``RECALIB_`` (one table in the README).

Defaults come from :mod:`recalib.defaults`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from recalib import defaults


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Settings of the API, the worker and ``recalib serve``; each field is ``RECALIB_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="RECALIB_", extra="ignore")

    redis_url: str | None = Field(
        None,
        description=(
            "Redis URL. Unset: `recalib serve` starts an embedded Valkey under the data "
            "directory; the API and `recalib worker` alone use redis://127.0.0.1:6379/0 (logged) "
            "and a worker exits at once, with one line, when it does not answer."
        ),
    )
    data_dir: Path = Field(
        Path(defaults.DATA_DIR), description="Uploads, job artifacts, embedded DB."
    )
    queue_name: str = Field(defaults.QUEUE_NAME, description="RQ queue name.")
    max_upload_bytes: int = Field(
        defaults.MAX_UPLOAD_BYTES, ge=1, description="Largest accepted upload."
    )
    max_request_bytes: int = Field(
        defaults.MAX_REQUEST_JSON_BYTES,
        ge=1024,
        description=(
            "Largest request body other than an upload (a job's JSON), bytes; larger ones are "
            "refused (413) before they are read."
        ),
    )
    upload_idle_timeout_s: float = Field(
        defaults.UPLOAD_IDLE_TIMEOUT_S,
        gt=0,
        description=(
            "A request body (upload or JSON) that sends nothing for this long is refused (408) "
            "and its connection closed."
        ),
    )
    http_keepalive_s: int = Field(
        defaults.HTTP_KEEPALIVE_S,
        ge=1,
        description="uvicorn `timeout_keep_alive`: idle keep-alive connections close after this.",
    )
    http_max_header_bytes: int = Field(
        defaults.HTTP_MAX_HEADER_BYTES,
        ge=4096,
        description=(
            "Largest request headers, bytes: the API answers 431 past it (and uvicorn's h11 "
            "parser, given it as `h11_max_incomplete_event_size`, stops reading)."
        ),
    )
    http_max_connections: int = Field(
        defaults.HTTP_MAX_CONNECTIONS,
        ge=1,
        description="uvicorn `limit_concurrency`: connections past this get 503 at once.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated `tenant:key` or `tenant:sha256:<hex of key>` entries. Empty: the API "
            "is open (a warning is logged at start)."
        ),
    )
    job_timeout_s: int = Field(
        defaults.JOB_TIMEOUT_S, ge=1, description="A running job is failed after this."
    )
    job_max_attempts: int = Field(
        defaults.JOB_MAX_ATTEMPTS,
        ge=1,
        le=10,
        description="Runs of a job whose worker died (1 = no retry).",
    )
    reaper_interval_s: float = Field(
        defaults.REAPER_INTERVAL_S,
        gt=0,
        description="How often the API looks for jobs of dead workers.",
    )
    worker_heartbeat_s: int = Field(
        defaults.WORKER_HEARTBEAT_S,
        ge=1,
        description="Worker heartbeat period; a worker is dead after 3 missed beats.",
    )
    worker_drain_timeout_s: int = Field(
        defaults.WORKER_DRAIN_TIMEOUT_S,
        ge=0,
        description=(
            "After SIGTERM a worker takes no new job and lets the running one finish for this "
            "long, seconds; past it the job is handed back to the queue (run again from the "
            "start by another worker) and the worker exits. 0: no deadline. Set it below the "
            "time the platform waits before SIGKILL (Kubernetes' terminationGracePeriodSeconds)."
        ),
    )
    ready_requires_worker: bool = Field(
        False,
        description=(
            "`/readyz` is 503 while no live worker can take the queue. `recalib serve` turns it "
            "on when it runs the workers (or the embedded Valkey); an API deployed alone reports "
            "workers without requiring them."
        ),
    )
    worker_device: str = Field("auto", description="Device of `recalib worker`: auto, cpu, cuda:N.")
    worker_mode: Literal["warm", "fork"] = Field(
        defaults.WORKER_MODE,
        description=(
            "`warm`: each worker keeps one runner process (spawned, never forked) that has torch "
            "loaded and forks a fresh sandboxed process for each job; `fork`: each job starts a "
            "one-shot runner of its own (pays torch's import every job)."
        ),
    )
    sandbox: Literal["strict", "basic", "off"] = Field(
        "strict",
        description=(
            "How jobs' models are confined (README, Security). `strict`: Landlock (files, TCP), "
            "seccomp (no socket, program, process or tracing) and a network namespace; "
            "`basic`: without the namespace (containers that forbid unshare); `off`: none "
            "(trusted models only). A worker refuses to start when a mechanism is missing."
        ),
    )
    job_memory_mb: int = Field(
        16384,
        ge=0,
        description=(
            "Address space a job's sandboxed process may map, MiB (RLIMIT_AS; 0: unbounded; "
            "not applied to CUDA jobs, whose driver maps far more than it uses)."
        ),
    )
    runner_max_jobs: int = Field(
        defaults.RUNNER_MAX_JOBS,
        ge=1,
        description="A warm runner is replaced by a fresh one after this many jobs.",
    )
    runner_max_rss_mb: int = Field(
        defaults.RUNNER_MAX_RSS_MB,
        ge=0,
        description=(
            "A warm runner whose resident memory is over this after a job is replaced, MiB "
            "(0: never)."
        ),
    )
    data_workers: int = Field(
        defaults.DATA_WORKERS,
        ge=-1,
        description=(
            "DataLoader processes decoding image archives while the model computes (0: in the "
            "job's own process); -1: min(8, CPU cores - 1). Only with `RECALIB_SANDBOX=off`: "
            "the sandbox lets a job start no process."
        ),
    )
    retention_s: int = Field(
        defaults.RETENTION_S,
        ge=0,
        description="Files and finished jobs older than this are deleted; 0 keeps them forever.",
    )
    arch_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(defaults.ARCH_ALLOWLIST),
        description="Module prefixes an `arch` (`module:callable`) may be imported from.",
    )
    vet_models: bool = Field(
        True,
        description=(
            "Vet `.pt2` and TorchScript models by allowlist (operators, names) before they run, "
            "a second layer behind the sandbox. `false` only to prove the sandbox alone holds "
            "(the escape suite does)."
        ),
    )
    allow_unsafe_pickle: bool = Field(
        False,
        description="Operator opt-in to unpickle whole-module `.pt` files (runs arbitrary code).",
    )
    max_archive_members: int = Field(
        defaults.MAX_ARCHIVE_MEMBERS, ge=1, description="Most entries in an image archive."
    )
    max_archive_bytes: int = Field(
        defaults.MAX_ARCHIVE_BYTES,
        ge=1,
        description="Most uncompressed bytes read from an image archive.",
    )
    max_image_pixels: int = Field(
        defaults.MAX_IMAGE_PIXELS, ge=1, description="Largest decoded image, pixels."
    )
    outbound_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated hosts or CIDRs that input URIs and webhooks may reach although they "
            "are loopback, private, link-local or otherwise not public (e.g. "
            "`minio.internal,10.0.0.0/8`). Empty: only public addresses."
        ),
    )
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated `tenant:whsec_<base64>` entries (`*:` for any tenant): the secret "
            "that signs a tenant's webhooks (Standard Webhooks). A job may ask for a webhook "
            "only when its tenant has one."
        ),
    )
    webhook_retry_s: int = Field(
        defaults.WEBHOOK_RETRY_S,
        ge=0,
        description=(
            "A webhook delivery is retried (backoff 1, 2, 4 … s, at most "
            f"{defaults.WEBHOOK_MAX_BACKOFF_S:g} s apart) until this long after its event, then "
            "marked failed."
        ),
    )
    webhook_progress_interval_s: float = Field(
        defaults.WEBHOOK_PROGRESS_INTERVAL_S,
        ge=0,
        description="At most one `progress` webhook per job per this many seconds.",
    )
    storage_url: str = Field(
        "",
        description=(
            "Where uploads and artifacts live: empty for RECALIB_DATA_DIR on this machine (the "
            "API and the workers then share it), or `s3://bucket/prefix` for S3-compatible "
            "object storage (workers then need no shared volume). Credentials come from the "
            "standard AWS chain: environment, profile, instance role."
        ),
    )
    s3_endpoint_url: str = Field(
        "",
        description=(
            "Endpoint of an S3-compatible store (e.g. `http://seaweedfs:8333`); empty: AWS S3 "
            "(region from AWS_REGION or the profile)."
        ),
    )
    s3_public_endpoint_url: str = Field(
        "",
        description=(
            "Endpoint that clients reach for presigned URLs when it differs from "
            "RECALIB_S3_ENDPOINT_URL (the API's view of the store); empty: the same."
        ),
    )
    presigned_downloads: bool = Field(
        False,
        description=(
            "With S3 storage, artifact downloads answer 307 to a presigned URL of the store "
            "instead of streaming through the API."
        ),
    )
    presigned_expiry_s: int = Field(
        defaults.PRESIGNED_EXPIRY_S,
        ge=60,
        le=7 * 24 * 3600,
        description=(
            "Lifetime of presigned URLs (direct uploads, downloads); a direct upload not "
            "completed by then is aborted by retention."
        ),
    )
    input_cache_bytes: int = Field(
        defaults.INPUT_CACHE_BYTES,
        ge=0,
        description=(
            "Bytes of inputs a worker keeps on local disk, by sha256: fetched by URI, and "
            "uploads when the store is S3 (least recently used evicted first); 0: no cache."
        ),
    )
    uri_fetch_deadline_s: float = Field(
        300.0,
        gt=0,
        description=(
            "Longest download of one input given by https:// URI, seconds, redirects included; "
            "past it the fetch fails, naming the URI (each read also times out after 30 s)."
        ),
    )
    mlflow_tracking_uri: str = Field(
        "",
        description=(
            "MLflow tracking server whose Model Registry `models:/` model URIs and "
            "`options.register` use (credentials from MLflow's own variables, e.g. "
            "MLFLOW_TRACKING_TOKEN); empty: no registry. Workers need `recalib[mlflow]`."
        ),
    )
    host: str = Field(defaults.HOST, description="`recalib serve` bind address.")
    port: int = Field(defaults.PORT, ge=1, le=65535, description="`recalib serve` port.")
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator(
        "api_keys", "arch_allowlist", "outbound_allow_hosts", "webhook_secrets", mode="before"
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
