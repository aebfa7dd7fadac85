"""Acceptance: hostile requests to every route of the live ``/openapi.json`` never get a 5xx, and
afterwards the service still lists jobs and runs the next one to success.

Hostile means: non-finite numbers (``NaN``, ``Infinity``, ``1e999``) in every number of every JSON
body (found by walking the schema) and in every query parameter, absurd path parameters, bodies
over ``RECALIB_MAX_REQUEST_BYTES`` (with ``Content-Length`` and chunked), and huge header values.
The API and a real ``recalib worker`` run as processes (tests/live.py) over the real Valkey.
Bounded: a few hundred requests, well under a minute once the stack is up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from recalib import defaults
from tests.live import (
    Stack,
    create_job,
    upload,
    wait_for_job,
)

pytestmark = pytest.mark.slow

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]
QUERY_VALUES = [*NON_FINITE, "9" * 400, "-1", "", "\u00e9\u0000"]
PATH_VALUES = ["NaN", "1e999", "j_" + "A" * 5000, "f_" + "%00" * 20, "..%2F..%2Fetc"]
HUGE_HEADERS = [
    "Authorization",
    "Idempotency-Key",
    "Last-Event-ID",
    "Range",
    "If-None-Match",
    "X-Filename",
    "Content-Type",
    "X-Anything",
]
OVERSIZED_BYTES = defaults.MAX_REQUEST_JSON_BYTES + 1
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stack(live_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(live_redis_url, tmp_path_factory.mktemp("fuzz")) as stack:
        stack.start_api()
        stack.start_worker("fuzz-w1")
        yield stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


# -- the schema: operations and the numbers in their bodies ------------------------------------


def _resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = doc["components"]["schemas"][name]
    return schema


def number_paths(schema: dict[str, Any], doc: dict[str, Any], depth: int = 0) -> list[list[Any]]:
    """JSON paths (keys, and 0 for list items) of every number and integer under ``schema``."""
    schema = _resolve(schema, doc)
    if depth > 8:
        return []
    if schema.get("type") in ("number", "integer"):
        return [[]]
    paths: list[list[Any]] = []
    for option in schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", []):
        paths += number_paths(option, doc, depth + 1)
    if schema.get("type") == "array" and "items" in schema:
        paths += [[0, *p] for p in number_paths(schema["items"], doc, depth + 1)]
    for key, sub in schema.get("properties", {}).items():
        paths += [[key, *p] for p in number_paths(sub, doc, depth + 1)]
    return paths


def body_with(base: dict[str, Any], path: list[Any], literal: str) -> bytes:
    """``base`` as JSON text with the bare ``literal`` (``NaN``...) at ``path``."""
    marker = "__NON_FINITE__"
    body = json.loads(json.dumps(base))
    node: Any = body
    for step, nxt in zip(path, [*path[1:], None], strict=True):
        if nxt is None:  # the number itself
            if isinstance(node, list):
                node[:] = [marker]
            else:
                node[step] = marker
            break
        child: Any = [] if isinstance(nxt, int) else {}
        if isinstance(node, list):
            node[:] = node[:1] or [child]
            node = node[0]
        else:
            node = node.setdefault(step, child)
    return json.dumps(body).replace(f'"{marker}"', literal).encode()


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


# -- the test -----------------------------------------------------------------------------------


class Tally:
    """Sends the requests; keeps every 5xx, and every status outside what a request expects."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.sent = 0
        self.server_errors: list[str] = []
        self.unexpected: list[str] = []
        self.transport_errors: list[str] = []

    def send(self, method: str, url: str, expect: set[int] | None = None, **kwargs: Any) -> None:
        """``expect``: the statuses allowed (any below 500 when None)."""
        self.sent += 1
        what = f"{method} {url[:80]} {str(kwargs.get('content', ''))[:60]}"
        try:
            response = self.client.request(method, url, **kwargs)
        except httpx.TransportError as exc:  # the server closed early: fine if it lives on
            self.transport_errors.append(f"{what}: {type(exc).__name__}")
            if self.client.get("/healthz").status_code != 200:
                self.server_errors.append(f"{what}: the API stopped answering")
            return
        if response.status_code >= 500:
            self.server_errors.append(f"{what} → {response.status_code}")
        elif expect is not None and response.status_code not in expect:
            self.unexpected.append(f"{what} → {response.status_code}")


def test_hostile_requests_get_no_5xx_and_the_service_runs_the_next_job(
    stack: Stack, client: httpx.Client, digits_ids: dict[str, str], tmp_path, record_property
) -> None:
    doc = client.get("/openapi.json").json()
    ops = operations(doc)
    assert len(ops) >= 15, [f"{m} {p}" for m, p, _ in ops]
    (tmp_path / "spare.npz").write_bytes(b"spare")
    job = create_job(
        client, {"model_file": digits_ids["model"], "calibration_file": digits_ids["calibration"]}
    )
    wait_for_job(client, job["id"], {"succeeded", "failed"}, timeout_s=120)
    valid = {"job_id": job["id"], "file_id": upload(client, tmp_path / "spare.npz")}
    valid["upload_id"] = "u_" + "A" * 24  # direct uploads: none such (and local storage: 409)
    job_body = {"model_file": digits_ids["model"], "calibration_file": digits_ids["calibration"]}
    tally = Tally(client)

    for method, template, op in ops:
        url = template.format(**valid)
        for param in op.get("parameters", []):
            if param["in"] == "query":
                for value in QUERY_VALUES:
                    tally.send(method, url, params={param["name"]: value})
            if param["in"] == "path":
                for value in PATH_VALUES:
                    bad = template.replace("{" + param["name"] + "}", value)
                    tally.send(method, bad)
        content = op.get("requestBody", {}).get("content", {})
        if "application/json" in content:
            schema = content["application/json"]["schema"]
            for path in number_paths(schema, doc):
                for literal in NON_FINITE:
                    tally.send(
                        method,
                        url,
                        {422},
                        content=body_with(job_body, path, literal),
                        headers=JSON,
                    )
            text = json.dumps(job_body)[:-1] + ', "arch_kwargs": {"x": [1e999, NaN]}}'
            tally.send(method, url, {422}, content=text, headers=JSON)
        capped = {413} if (method, template) != ("POST", "/v1/files") else None
        big = b"[" + b"1," * (OVERSIZED_BYTES // 2) + b"1]"
        tally.send(method, url, capped if content else None, content=big, headers=JSON)
        chunked = iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
        tally.send(method, url, capped if content else None, content=chunked, headers=JSON)
        for name in HUGE_HEADERS:
            tally.send(method, url, {400, 422, 431}, headers={name: "9" * 1_000_000})
            tally.send(method, url, headers={name: "9" * 20_000})

    assert tally.server_errors == [], tally.server_errors
    assert tally.unexpected == [], tally.unexpected
    assert tally.sent > 300
    record_property("requests", tally.sent)
    record_property("closed_early", len(tally.transport_errors))
    assert stack.api is not None and stack.api.alive()
    assert "unexpected error" not in stack.api.log()
    assert stack.workers["fuzz-w1"].alive()

    listing = client.get("/v1/jobs")
    assert listing.status_code == 200
    assert [j["id"] for j in listing.json()["items"]] == [job["id"]]  # no hostile one stored
    after = create_job(client, job_body | {"eval_file": digits_ids["evaluation"]})
    done = wait_for_job(client, after["id"], {"succeeded", "failed", "cancelled"}, timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
