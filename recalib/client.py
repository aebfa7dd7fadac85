"""A Python client for the recalib REST API (torch-free; what ``recalib submit`` uses).

Example::

    from recalib.client import RecalibClient

    with RecalibClient("http://127.0.0.1:8000", api_key="s3cret") as client:
        model = client.upload_file("resnet50.pt2")   # skipped if the server has it (same name)
        calib = client.upload_file("target-images.tar")
        job = client.create_job(model.id, calib.id, options={"batch_size": 32, "fold": True})
        job = client.wait(job.id, on_progress=lambda j: print(j.progress))
        if job.status == "succeeded":
            print(job.result.verdict, job.result.after.top1)
            client.download(job.id, "checkpoint", "out/")  # sha256-verified

Errors come back as the :mod:`recalib.errors` class the server named in its problem document
(``NotFoundError``, ``InvalidOptionError``, ...); a server that cannot be reached raises
:class:`~recalib.errors.ServiceUnavailableError` saying so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import httpx

from recalib import defaults
from recalib.checksums import sha256_of
from recalib.client_problems import invalid_option, raise_for_problem
from recalib.client_upload import CHUNK_BYTES, direct_upload, read_chunks
from recalib.contract import FilePublic, JobCreate, JobEvent, JobOptions, JobPublic, JobStatus, Page
from recalib.errors import (
    InternalError,
    ServiceUnavailableError,
    UserError,
)

logger = logging.getLogger(__name__)

Artifact = Literal["checkpoint", "report", "folded", "onnx"]


class RecalibClient:
    """A session with one recalib server.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` (default: ``$RECALIB_SERVER``).
        api_key: sent as ``Authorization: Bearer <key>`` (default: ``$RECALIB_API_KEY``).
        timeout_s: per-request timeout for connect/read/write, seconds.
    """

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.base_url = (
            base_url or os.environ.get("RECALIB_SERVER") or defaults.SERVER_URL
        ).rstrip("/")
        api_key = api_key or os.environ.get("RECALIB_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RecalibClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files -----------------------------------------------------------------------------

    def upload_file(
        self, path: str | os.PathLike[str], *, skip_existing: bool = True, direct: bool = True
    ) -> FilePublic:
        """Upload a file (streamed); with ``skip_existing``, reuse a server file of equal sha256
        and the same name. With ``direct`` and a server on object storage, the bytes go straight
        to the store through presigned URLs (:mod:`recalib.client_upload`), else through the API.

        The name matters as much as the content: the worker reads the format from the extension
        and downloads are named after it, so bytes uploaded before as ``data.npz`` are uploaded
        again as ``model.pt2`` (a name the server stores differently, after replacing unsafe
        characters, is always uploaded again).
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file", file=str(path))
        sha256 = sha256_of(path)
        if skip_existing:
            existing = self.find_file(sha256)
            if existing is not None and existing.filename == path.name:
                logger.info("%s is already on the server as %s", path, existing.id)
                return existing
        if direct:  # straight to the server's object store, when it offers that
            try:
                uploaded = direct_upload(self._http, path, sha256, raise_for_problem)
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
            if uploaded is not None:
                return uploaded
        response = self._request(
            "POST",
            "/v1/files",
            params={"filename": path.name},
            content=read_chunks(path),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(path.stat().st_size),
            },
        )
        return FilePublic.model_validate_json(response.content)

    def find_file(self, sha256: str) -> FilePublic | None:
        """The newest file of this tenant with that content, if any."""
        page = self._get_model(Page[FilePublic], "/v1/files", params={"sha256": sha256})
        return page.items[0] if page.items else None

    def list_files(self, *, limit: int = 50, cursor: str | None = None) -> Page[FilePublic]:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        return self._get_model(Page[FilePublic], "/v1/files", params=params)

    def delete_file(self, file_id: str) -> None:
        self._request("DELETE", f"/v1/files/{file_id}")

    # -- jobs ------------------------------------------------------------------------------

    def create_job(
        self,
        model_file: str,
        calibration_file: str,
        eval_file: str | None = None,
        *,
        options: JobOptions | Mapping[str, Any] | None = None,
        arch: str | None = None,
        arch_kwargs: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        kind: str | None = None,
        source_eval_file: str | None = None,
    ) -> JobPublic:
        """Queue a job over uploaded file ids; options are validated locally first. ``kind``:
        ``recalibrate`` (the server's default when None) or ``drift`` (a drift check)."""
        try:
            extra = {"kind": kind} if kind is not None else {}
            body = JobCreate(
                **extra,  # type: ignore[arg-type]
                model_file=model_file,
                calibration_file=calibration_file,
                eval_file=eval_file,
                source_eval_file=source_eval_file,
                arch=arch,
                arch_kwargs=dict(arch_kwargs or {}),
                options=JobOptions.model_validate(options or {}),
            )
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise invalid_option(exc) from exc
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request(
            "POST",
            "/v1/jobs",
            json=body.model_dump(mode="json", exclude_unset=True),
            headers=headers,
        )
        return JobPublic.model_validate_json(response.content)

    def get_job(self, job_id: str) -> JobPublic:
        return self._get_model(JobPublic, f"/v1/jobs/{job_id}")

    def list_jobs(
        self, *, status: JobStatus | None = None, limit: int = 50, cursor: str | None = None
    ) -> Page[JobPublic]:
        params: dict[str, Any] = {"limit": limit}
        params |= {"status": status.value} if status else {}
        params |= {"cursor": cursor} if cursor else {}
        return self._get_model(Page[JobPublic], "/v1/jobs", params=params)

    def events(self, job_id: str, *, after: int = 0) -> list[JobEvent]:
        response = self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
        return [JobEvent.model_validate(item) for item in response.json()]

    def cancel(self, job_id: str) -> JobPublic:
        response = self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return JobPublic.model_validate_json(response.content)

    def wait(
        self,
        job_id: str,
        *,
        on_progress: Callable[[JobPublic], None] | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        max_outage_s: float = 60.0,
    ) -> JobPublic:
        """Poll until the job ends; return it (succeeded, failed or cancelled).

        ``on_progress`` sees every polled state. A server briefly unreachable (restart) is
        retried for up to ``max_outage_s``; ``timeout_s`` bounds the whole wait
        (:class:`ServiceUnavailableError` when it runs out).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        outage_since: float | None = None
        while True:
            try:
                job = self.get_job(job_id)
                outage_since = None
            except ServiceUnavailableError:
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > max_outage_s:
                    raise
                time.sleep(poll_s)
                continue
            if on_progress is not None:
                on_progress(job)
            if job.status.is_final:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceUnavailableError(
                    f"job {job_id} still {job.status} after {timeout_s} s"
                )
            time.sleep(poll_s)

    def download(self, job_id: str, which: Artifact, dest_dir: str | os.PathLike[str]) -> Path:
        """Save an artifact into ``dest_dir`` under the server's name; the sha256 is verified.

        Written to a ``.part`` file first and renamed once the digest matches the ETag.
        """
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/{which}") as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for_problem(response)
                name = _download_name(response, f"{job_id}.{which}")
                expected = response.headers.get("etag", "").strip('"')
                part = dest_dir / f".{name}.part"
                digest = hashlib.sha256()
                with part.open("wb") as fh:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        digest.update(chunk)
                        fh.write(chunk)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if expected and digest.hexdigest() != expected:
            part.unlink(missing_ok=True)
            raise InternalError(
                f"{which} of {job_id}: sha256 {digest.hexdigest()} differs from the server's "
                f"{expected} (download corrupted; retry)"
            )
        return part.replace(dest_dir / name)

    # -- plumbing --------------------------------------------------------------------------

    def _get_model(self, model: Any, url: str, **kwargs: Any) -> Any:
        return model.model_validate_json(self._request("GET", url, **kwargs).content)

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        raise_for_problem(response)
        return response

    def _unreachable(self, exc: Exception) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"the recalib server at {self.base_url} is unreachable ({type(exc).__name__}: {exc}); "
            "is it running? (set --server or RECALIB_SERVER)"
        )


def _download_name(response: httpx.Response, default: str) -> str:
    disposition = response.headers.get("content-disposition", "")
    match = re.search(r"filename\*=utf-8''([^;]+)|filename=\"([^\"]+)\"", disposition, re.I)
    name = (match.group(1) or match.group(2)) if match else default
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(unquote(name)).name).lstrip(".")
    return name or default
