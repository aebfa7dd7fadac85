"""Inputs given by URI (``model_uri``...): one fetch function per scheme, in :data:`FETCHERS`.

A fetch function gets the URI, a :class:`Sink` (writes, hashes and caps what it is given at
``RECALIB_MAX_UPLOAD_BYTES``, like an upload) and what the cache holds for the URI; it returns
the source's validator (ETag, Last-Modified) or says that the cached copy is still current. A
scheme is added by writing its function (and, optionally, its create-time check in
:data:`CHECKS`) and listing it in ``recalib.contract.api.INPUT_URI_SCHEMES``.

An ``https://`` fetch, redirects included, ends after ``RECALIB_URI_FETCH_DEADLINE_S``
(:class:`FetchDeadline`): httpx's timeouts are per read, and a source that sends a byte now and
then would otherwise hold a worker until the job's timeout.

Safety: ``https://`` URLs, every redirect included, and S3 endpoints named in a URI
(``s3://bucket/key?endpoint=https://host``) reach only public addresses unless the operator
lists them in ``RECALIB_OUTBOUND_ALLOW_HOSTS`` (:mod:`recalib.inputs.outbound`). ``s3://`` URIs
without an endpoint use the operator's own (``RECALIB_S3_ENDPOINT_URL``, or AWS) and the
worker's credentials; a URI never carries credentials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx

from recalib.contract import JobCreate
from recalib.errors import (
    InvalidDataError,
    InvalidOptionError,
    NotFoundError,
    PayloadTooLargeError,
    UserError,
)
from recalib.files.storage import Storage
from recalib.files.storage.meter import Meter, MeteredFile
from recalib.inputs.cache import CacheEntry
from recalib.inputs.outbound import OutboundPolicy, guarded_client
from recalib.settings import Settings, get_settings

CHUNK_BYTES = 1024 * 1024
HTTP_TIMEOUT_S = 30.0  # each connect, read and write; the whole fetch: FetchContext.deadline_s


def _deadline_setting() -> float:
    return get_settings().uri_fetch_deadline_s


@dataclass
class FetchContext:
    """What every fetch needs: the policy, the cap, the configured store and S3 endpoint."""

    policy: OutboundPolicy
    max_bytes: int
    store: Storage | None = None
    s3_endpoint_url: str | None = None
    verify: Any = True  # httpx's verify: True, or a CA bundle / SSL context (tests)
    mlflow_tracking_uri: str | None = None  # for models:/ URIs (RECALIB_MLFLOW_TRACKING_URI)
    # the longest https:// fetch, redirects included (RECALIB_URI_FETCH_DEADLINE_S)
    deadline_s: float = dataclasses.field(default_factory=_deadline_setting)


def fetch_context(settings: Settings, store: Storage | None) -> FetchContext:
    """The context ``settings`` give: their outbound rules, cap, S3 endpoint, MLflow, deadline."""
    return FetchContext(
        policy=OutboundPolicy(settings.outbound_allow_hosts),
        max_bytes=settings.max_upload_bytes,
        store=store,
        s3_endpoint_url=settings.s3_endpoint_url or None,
        mlflow_tracking_uri=settings.mlflow_tracking_uri or None,
        deadline_s=settings.uri_fetch_deadline_s,
    )


class Sink(MeteredFile):
    """The destination of a fetch: written, hashed and counted; over ``max_bytes`` it refuses."""

    def __init__(self, path: Path, max_bytes: int, field: str, uri: str) -> None:
        self.max_bytes, self.field, self.uri = max_bytes, field, uri
        super().__init__(path, Meter(max_bytes, lambda: self._too_large(None)), mode="wb")

    def check_size(self, size: int | None) -> None:
        """Refuse before reading when the source already says it is too large."""
        if size is not None and size > self.max_bytes:
            raise self._too_large(size)

    def _too_large(self, size: int | None) -> PayloadTooLargeError:
        has = f"has {size} bytes" if size is not None else "sends more"
        return PayloadTooLargeError(
            f"{self.field}: {self.uri} {has}; inputs are limited to {self.max_bytes} bytes "
            "(RECALIB_MAX_UPLOAD_BYTES)",
            field=self.field,
        )


@dataclass(frozen=True)
class Fetched:
    validator: str | None  # what identifies this version at the source (cache key with the URI)
    not_modified: bool = False  # the cached entry is current; nothing was written
    filename: str | None = None  # the input's file name when the URI does not end in it


FetchFn = Callable[[str, str, Sink, CacheEntry | None, FetchContext], Fetched]
CheckFn = Callable[[str, str, FetchContext], None]


# -- https -------------------------------------------------------------------------------------


class FetchDeadline:
    """The end of one HTTP fetch, ``seconds`` from now, redirects included.

    Each request's timeouts are cut to the time left (:meth:`before_request`, a request hook of
    the client), and at the deadline a timer shuts down the sockets the fetch opened: that
    wakes a read blocked anywhere (TLS, headers, body), httpx raises, and :meth:`passed` tells
    the caller why. Use it as a context manager (the timer stops on exit).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._ends = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._shut = False
        self._timer = threading.Timer(seconds, self._shut_down)
        self._timer.daemon = True

    def __enter__(self) -> FetchDeadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def passed(self) -> bool:
        return self._shut or time.monotonic() >= self._ends - 0.01  # a socket timeout's rounding

    def before_request(self, request: httpx.Request) -> None:
        left_s = self._ends - time.monotonic()
        if left_s <= 0:
            raise httpx.TimeoutException("the fetch deadline passed", request=request)
        timeout_s = min(HTTP_TIMEOUT_S, left_s)
        request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"),
                                                      timeout_s)  # fmt: skip
        request.extensions["trace"] = self._trace  # httpcore's: hands over each new socket

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event.endswith((".connect_tcp.complete", ".start_tls.complete")):  # proxies too
            sock = info["return_value"].get_extra_info("socket")
            with self._lock:
                self._sockets.append(sock)
                if self._shut:
                    _shut_down(sock)

    def _shut_down(self) -> None:
        with self._lock:
            self._shut = True
            for sock in self._sockets:
                _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    # socket.socket's shutdown, also for an SSLSocket: its own drops the TLS state under the
    # thread reading it. A socket already closed (or detached by TLS) raises: nothing to do.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def fetch_https(
    uri: str, field: str, sink: Sink, cached: CacheEntry | None, ctx: FetchContext
) -> Fetched:
    headers = {"If-None-Match": cached.validator} if cached else {}
    with FetchDeadline(ctx.deadline_s) as deadline:
        try:
            with (
                guarded_client(
                    ctx.policy,
                    field=field,
                    on_request=[deadline.before_request],
                    follow_redirects=True,
                    timeout=HTTP_TIMEOUT_S,
                    verify=ctx.verify,
                ) as client,
                client.stream("GET", uri, headers=headers) as response,
            ):
                return _receive(uri, field, sink, cached, response)
        except httpx.HTTPError as exc:
            if deadline.passed():
                raise UserError(
                    f"{field}: cannot fetch {uri}: not complete after {ctx.deadline_s:g} s, the "
                    "longest an input's download may take, redirects included "
                    "(RECALIB_URI_FETCH_DEADLINE_S)",
                    field=field,
                ) from exc
            raise UserError(f"{field}: cannot fetch {uri}: {exc}", field=field) from exc


def _receive(
    uri: str, field: str, sink: Sink, cached: CacheEntry | None, response: httpx.Response
) -> Fetched:
    if response.status_code == 304 and cached is not None:
        return Fetched(cached.validator, not_modified=True)
    if response.status_code in (404, 410):
        raise NotFoundError(f"{field}: {uri} was not found (HTTP 404)", field=field)
    if response.status_code != 200:
        raise UserError(f"{field}: {uri} answered HTTP {response.status_code}", field=field)
    length = response.headers.get("content-length")
    sink.check_size(int(length) if length and length.isdigit() else None)
    for chunk in response.iter_bytes(CHUNK_BYTES):
        sink.write(chunk)
    return Fetched(response.headers.get("etag"))


def check_https(uri: str, field: str, ctx: FetchContext) -> None:
    ctx.policy.check_url(uri, field=field)


# -- s3 ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str
    endpoint: str | None  # named in the URI (checked against the policy); None: the operator's


def parse_s3_uri(uri: str, field: str) -> S3Location:
    parts = urlsplit(uri)
    endpoint = parse_qs(parts.query).get("endpoint", [None])[0]
    key = unquote(parts.path.lstrip("/"))
    if not parts.netloc or not key:
        raise UserError(f"{field}: {uri!r} is not s3://bucket/key", field=field)
    return S3Location(parts.netloc, key, endpoint)


def _s3_client(location: S3Location, field: str, ctx: FetchContext) -> Any:
    from recalib.files.storage.s3 import S3Storage, make_client

    if location.endpoint is not None:
        ctx.policy.check_url(location.endpoint, field=field)
        return make_client(location.endpoint)
    if isinstance(ctx.store, S3Storage):
        return ctx.store.client  # the configured store's endpoint (and connection pool)
    return make_client(ctx.s3_endpoint_url)


def fetch_s3(
    uri: str, field: str, sink: Sink, cached: CacheEntry | None, ctx: FetchContext
) -> Fetched:
    from recalib.files.storage.s3_errors import error_code, is_missing

    location = parse_s3_uri(uri, field)
    client = _s3_client(location, field, ctx)
    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key)
        validator = str(head.get("ETag") or "") or None
        if cached is not None and validator == cached.validator:
            return Fetched(validator, not_modified=True)
        sink.check_size(int(head["ContentLength"]))
        body = client.get_object(Bucket=location.bucket, Key=location.key)["Body"]
        try:
            for chunk in body.iter_chunks(CHUNK_BYTES):
                sink.write(chunk)
        finally:
            body.close()
    except UserError:
        raise
    except Exception as exc:
        if is_missing(exc):
            raise NotFoundError(f"{field}: {uri} does not exist", field=field) from exc
        code = error_code(exc)
        reason = f"{code}" if code else f"{type(exc).__name__}: {exc}"
        raise UserError(
            f"{field}: cannot read {uri} ({reason}); the worker reads s3:// URIs with its own "
            "credentials (RECALIB_S3_ENDPOINT_URL, AWS credential chain)",
            field=field,
        ) from exc
    return Fetched(validator)


def check_s3(uri: str, field: str, ctx: FetchContext) -> None:
    """Refuse at create time what can be known: a forbidden endpoint, a missing object, one over
    the cap. What the API cannot tell (other credentials, another store down) the worker will."""
    from recalib.files.storage.s3_errors import is_missing

    location = parse_s3_uri(uri, field)
    client = _s3_client(location, field, ctx)
    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key)
    except Exception as exc:
        if is_missing(exc):
            raise NotFoundError(f"{field}: {uri} does not exist", field=field) from exc
        return
    size = int(head.get("ContentLength", 0))
    if size > ctx.max_bytes:
        raise PayloadTooLargeError(
            f"{field}: {uri} has {size} bytes; inputs are limited to {ctx.max_bytes} bytes "
            "(RECALIB_MAX_UPLOAD_BYTES)",
            field=field,
        )


# -- models:/ (MLflow's model registry) ------------------------------------------------------


def _tracking_uri(field: str, ctx: FetchContext) -> str:
    if not ctx.mlflow_tracking_uri:
        raise InvalidDataError(
            f"{field}: models:/ URIs need the operator's MLflow registry; set "
            "RECALIB_MLFLOW_TRACKING_URI on the API and the workers",
            field=field,
        )
    return ctx.mlflow_tracking_uri


def fetch_models(
    uri: str, field: str, sink: Sink, cached: CacheEntry | None, ctx: FetchContext
) -> Fetched:
    """A registered version's model file. A numbered version never changes, so a cached copy
    of it is used without asking the registry; an alias is resolved every time. The validator
    is ``<name>/<version>/<file name>`` (the file name's suffix tells the format)."""
    from recalib.registry import models as registry

    tracking_uri = _tracking_uri(field, ctx)
    name_version = uri.removeprefix("models:/")
    if cached is not None and cached.validator and "@" not in uri:
        name, version, filename = cached.validator.rsplit("/", 2)
        if f"{name}/{version}" == name_version:
            return Fetched(cached.validator, not_modified=True, filename=filename)
    filename, validator = registry.fetch_models(uri, field, sink, tracking_uri)
    return Fetched(f"{validator}/{filename}", filename=filename)


def check_models(uri: str, field: str, ctx: FetchContext) -> None:
    _tracking_uri(field, ctx)


def models_source(validator: str) -> str:
    """``models:/<name>/<version>`` of what a ``models:/`` fetch resolved to."""
    return "models:/" + validator.rsplit("/", 1)[0]


FETCHERS: dict[str, FetchFn] = {"https": fetch_https, "s3": fetch_s3, "models": fetch_models}
CHECKS: dict[str, CheckFn] = {"https": check_https, "s3": check_s3, "models": check_models}


def scheme_of(uri: str, field: str) -> str:
    scheme = urlsplit(uri).scheme
    if scheme not in FETCHERS:
        raise InvalidDataError(
            f"{field}: {uri!r}: no fetcher for {scheme}:// (known: {', '.join(sorted(FETCHERS))})",
            field=field,
        )
    return scheme


def check_uri(uri: str, field: str, ctx: FetchContext) -> None:
    """Create-time checks of ``uri`` (4xx errors naming ``field``)."""
    check = CHECKS.get(scheme_of(uri, field))
    if check is not None:
        check(uri, field, ctx)


def check_job_uris(request: JobCreate, ctx: FetchContext) -> None:
    """Refuse a job whose URIs can be known bad now: a forbidden host, an object that does not
    exist or is over the cap (the error names the field). Admission's check, at create time."""
    for role in ("model", "calibration", "eval", "source_eval"):
        uri = getattr(request, f"{role}_uri")
        if uri is not None:
            try:
                check_uri(uri, f"{role}_uri", ctx)
            except NotFoundError as exc:  # the request is wrong, not its URL: 422 as for files
                raise InvalidOptionError(exc.message, field=f"{role}_uri") from exc


def fetch(
    uri: str, field: str, sink: Sink, cached: CacheEntry | None, ctx: FetchContext
) -> Fetched:
    """Fetch ``uri`` into ``sink`` (or confirm ``cached``), by its scheme's function."""
    return FETCHERS[scheme_of(uri, field)](uri, field, sink, cached, ctx)
