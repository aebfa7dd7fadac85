"""Property-based API conformance (schemathesis) against the live service: API, Redis, worker.

Every operation of ``/openapi.json`` gets generated requests, valid and invalid: no response may be
a 5xx, and every response must match its documented status, media type and schema. (Operations are
listed here, and a test checks the list against the schema, because schemathesis' lazy
``from_fixture`` loader does not run under pytest 9.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live import Stack, create_job, upload, wait_for_job, with_db

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 40
OPERATIONS = [
    ("POST", "/v1/files"),
    ("GET", "/v1/files"),
    ("GET", "/v1/files/{file_id}"),
    ("DELETE", "/v1/files/{file_id}"),
    ("POST", "/v1/uploads"),
    ("POST", "/v1/uploads/{upload_id}/complete"),
    ("DELETE", "/v1/uploads/{upload_id}"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/deliveries"),
    ("GET", "/v1/jobs/{job_id}/checkpoint"),
    ("GET", "/v1/jobs/{job_id}/report"),
    ("GET", "/v1/jobs/{job_id}/folded"),
    ("GET", "/v1/jobs/{job_id}/onnx"),
    ("GET", "/v1/jobs/{job_id}/report.html"),
    ("GET", "/v1/jobs/{job_id}/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def live_service(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker (tests/live.py) on a Redis database of this module's own."""
    url = with_db(redis_url, 14)
    redis.Redis.from_url(url).flushdb()
    with Stack(
        url, tmp_path_factory.mktemp("schemathesis"), RECALIB_MAX_UPLOAD_BYTES="1048576"
    ) as stack:
        stack.start_api()
        stack.start_worker("schemathesis-w1")
        yield stack


@pytest.fixture(scope="module")
def known_ids(live_service: Stack, digits_files) -> dict[str, str]:
    """A real file and a real succeeded job, so that the 200 branches get exercised too."""
    with live_service.client() as client:
        model = upload(client, digits_files["model"])
        calibration = upload(client, digits_files["calibration"])
        body = {"model_file": model, "calibration_file": calibration, "options": {"fold": True}}
        job = create_job(client, body)
        wait_for_job(client, job["id"], {"succeeded"}, timeout_s=120)
    return {"file_id": calibration, "job_id": job["id"]}


@pytest.fixture(scope="module")
def api_schema(live_service: Stack):
    return schemathesis.openapi.from_url(f"{live_service.url}/openapi.json")


def test_every_operation_is_exercised(api_schema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _http_can_carry(case) -> bool:
    """Whether HTTP/1.1 can carry the case's headers: uvicorn answers 400 itself, before the
    app, to a header name that is not a token or a Content-Length that is not a number (seen:
    negative cases with ``w2;`` and ``Content-Length: wRC.Lc``), which no API schema documents."""
    for name, value in (case.headers or {}).items():
        if not TOKEN.fullmatch(name):
            return False
        if name.lower() == "content-length" and not str(value).isdigit():
            return False
    return True


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_operation_conforms_to_the_schema(
    api_schema, live_service: Stack, known_ids: dict[str, str], method: str, path: str
) -> None:
    operation = api_schema[path][method]
    cases = operation.as_strategy() | operation.as_strategy(
        generation_mode=schemathesis.GenerationMode.NEGATIVE
    )
    known = {name: value for name, value in known_ids.items() if f"{{{name}}}" in path}
    if known:
        cases = cases | operation.as_strategy(path_parameters=known)

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure reproduces, a pass means the same
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def check(case) -> None:
        assume(_http_can_carry(case))
        case.call_and_validate(base_url=live_service.url, checks=CHECKS)

    check()
