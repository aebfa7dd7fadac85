"""``POST /v1/jobs`` with hostile bodies, and job routes over stored records that do not parse.

Real HTTP (uvicorn in a thread) over the real Valkey; no worker (jobs stay queued). Every case
here once answered 202 and stored a record that later broke the job's routes, the tenant's
listing, the worker and the reaper; now the request is a 422 naming the field, and a record that
is unreadable anyway (written straight into Redis here) is skipped by the listing and answers a
4xx problem on its own routes.
"""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
import redis

from recalib import defaults
from recalib.keys import ACTIVE_KEY, events_key, job_index_key, job_key

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]
# Every float field of JobCreate (and the int fields, which must refuse them too), as a JSON path.
NUMBER_FIELDS = [
    ("options", "momentum"),
    ("options", "prior_strength"),
    ("options", "tolerance"),
    ("options", "holdout"),
    ("options", "batch_size"),
    ("options", "max_samples"),
    ("options", "seed"),
    ("options", "tolerance_window"),
    ("options", "eval_batch_size"),
    ("options", "preprocess", "resize"),
    ("options", "preprocess", "center_crop"),
    ("options", "preprocess", "mean", 0),
    ("options", "preprocess", "std", 0),
]


def _raw_body(file_ids: dict[str, str], path: tuple[object, ...], literal: str) -> str:
    """The JSON text of a job body with ``literal`` (e.g. ``NaN``) at ``path``."""
    body: dict[str, object] = dict(file_ids)
    node: dict[str, object] = body
    for key, nxt in itertools.pairwise(path):
        child: object = [] if isinstance(nxt, int) else {}
        node = node.setdefault(str(key), child)  # type: ignore[assignment]
    marker = "__LITERAL__"
    if isinstance(path[-1], int):
        node.clear()  # type: ignore[attr-defined]
        node.append(marker)  # type: ignore[attr-defined]
    else:
        node[str(path[-1])] = marker
    return json.dumps(body).replace(f'"{marker}"', literal)


def _post_raw(client: httpx.Client, text: str) -> httpx.Response:
    return client.post("/v1/jobs", content=text, headers={"Content-Type": "application/json"})


def _assert_nothing_stored(client: httpx.Client) -> None:
    listing = client.get("/v1/jobs")
    assert listing.status_code == 200, listing.text
    assert listing.json()["items"] == []


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize("path", NUMBER_FIELDS, ids=lambda p: ".".join(map(str, p)))
def test_non_finite_number_is_422_naming_the_field(
    client: httpx.Client, file_ids, path: tuple[object, ...], literal: str
) -> None:
    response = _post_raw(client, _raw_body(file_ids, path, literal))
    assert response.status_code == 422, response.text[:500]
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["field"] == ".".join(str(p) for p in path)
    _assert_nothing_stored(client)


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize(
    "template",
    ['{"scale": %s}', '{"a": {"b": [1, 2, {"c": %s}]}}', '{"list": [[[%s]]]}'],
)
def test_non_finite_number_in_arch_kwargs_is_422(
    client: httpx.Client, file_ids, template: str, literal: str
) -> None:
    text = json.dumps(file_ids)[:-1] + ', "arch_kwargs": ' + template % literal + "}"
    response = _post_raw(client, text)
    assert response.status_code == 422, response.text[:500]
    assert response.json()["field"] == "arch_kwargs"
    assert "finite" in response.json()["detail"]
    _assert_nothing_stored(client)


def test_finite_arch_kwargs_of_every_json_type_are_kept(client: httpx.Client, file_ids) -> None:
    kwargs = {"n": 10, "x": 0.5, "s": "a", "b": True, "none": None, "l": [1, [2.5]], "d": {"e": 1}}
    response = client.post("/v1/jobs", json=file_ids | {"arch_kwargs": kwargs})
    assert response.status_code == 202, response.text[:500]
    fetched = client.get(f"/v1/jobs/{response.json()['id']}").json()
    assert fetched["request"]["arch_kwargs"] == kwargs


# -- sizes -------------------------------------------------------------------------------------


def test_oversized_arch_kwargs_is_422_naming_it(client: httpx.Client, file_ids) -> None:
    kwargs = {"blob": "x" * (defaults.MAX_ARCH_KWARGS_BYTES + 1)}
    response = client.post("/v1/jobs", json=file_ids | {"arch_kwargs": kwargs})
    assert response.status_code == 422, response.text[:500]
    assert response.json()["field"] == "arch_kwargs"
    assert str(defaults.MAX_ARCH_KWARGS_BYTES) in response.json()["detail"]
    _assert_nothing_stored(client)


def test_deeply_nested_arch_kwargs_is_422(client: httpx.Client, file_ids) -> None:
    depth = defaults.MAX_ARCH_KWARGS_DEPTH + 1
    text = json.dumps(file_ids)[:-1] + ', "arch_kwargs": ' + '{"a": ' * depth + "1"
    text += "}" * depth + "}"
    response = _post_raw(client, text)
    assert response.status_code == 422, response.text[:500]
    assert response.json()["field"] == "arch_kwargs"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"options": {"preprocess": {"mean": [0.5] * 1000}}}, "options.preprocess.mean"),
        ({"options": {"preprocess": {"std": [0.5] * 1000}}}, "options.preprocess.std"),
        ({"options": {"device": "cuda:" + "1" * 10_000}}, "options.device"),
        ({"arch": "torchvision.models:" + "r" * 10_000}, "arch"),
        ({"options": {"seed": 10**40}}, "options.seed"),
        ({"options": {"max_samples": 10**40}}, "options.max_samples"),
    ],
)
def test_oversized_field_is_422_naming_it(
    client: httpx.Client, file_ids, extra: dict[str, object], field: str
) -> None:
    response = client.post("/v1/jobs", json=file_ids | extra)
    assert response.status_code == 422, response.text[:500]
    assert response.json()["field"] == field


# -- stored records that do not parse -------------------------------------------------------

CORRUPT_RECORDS = {
    "null-float": None,  # filled in by the test: a valid record with prior_strength null
    "not-json": b"{not json",
    "wrong-shape": b'{"id": 1}',
}


def _store_corrupt(conn: redis.Redis, job_id: str, raw: bytes, tenant: str = "default") -> None:
    """A record as an older version or a bug might have left it, indexed like a real job."""
    conn.hset(job_key(job_id), mapping={"record": raw, "rq": f"{job_id}_rdeadbeef"})
    conn.rpush(events_key(job_id), b"{also not an event")
    conn.zadd(job_index_key(tenant), {f"{10**11:012d}:{job_id}": 0})
    conn.sadd(ACTIVE_KEY, job_id)


def _corrupt_raw(kind: str, client: httpx.Client, file_ids: dict[str, str]) -> bytes:
    if kind != "null-float":
        return CORRUPT_RECORDS[kind]  # type: ignore[return-value]
    good = client.post("/v1/jobs", json=file_ids).json()
    record = good | {"tenant": "default", "id": "j_" + "N" * 22}
    record["request"]["options"]["prior_strength"] = None
    return json.dumps(record).encode()


@pytest.mark.parametrize("kind", sorted(CORRUPT_RECORDS))
def test_an_unreadable_record_breaks_no_route(
    client: httpx.Client, file_ids, redis_conn: redis.Redis, kind: str
) -> None:
    raw = _corrupt_raw(kind, client, file_ids)
    bad_id = "j_" + "N" * 22
    _store_corrupt(redis_conn, bad_id, raw)
    good = client.post("/v1/jobs", json=file_ids).json()

    listing = client.get("/v1/jobs")
    assert listing.status_code == 200, listing.text
    listed = [job["id"] for job in listing.json()["items"]]
    assert good["id"] in listed and bad_id not in listed

    for method, url in [
        ("GET", f"/v1/jobs/{bad_id}"),
        ("GET", f"/v1/jobs/{bad_id}/events"),
        ("POST", f"/v1/jobs/{bad_id}/cancel"),
        ("GET", f"/v1/jobs/{bad_id}/report"),
    ]:
        response = client.request(method, url)
        assert 400 <= response.status_code < 500, (method, url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    sse = client.get(f"/v1/jobs/{bad_id}/events", headers={"Accept": "text/event-stream"})
    assert 400 <= sse.status_code < 500, sse.text
    assert client.get(f"/v1/jobs/{good['id']}").status_code == 200


def test_an_unreadable_record_of_this_tenant_is_409_saying_so(
    client: httpx.Client, redis_conn: redis.Redis
) -> None:
    bad_id = "j_" + "U" * 22
    raw = json.dumps({"id": bad_id, "tenant": "default", "status": "queued"}).encode()
    _store_corrupt(redis_conn, bad_id, raw)
    response = client.get(f"/v1/jobs/{bad_id}")
    assert response.status_code == 409, response.text
    assert "unreadable" in response.json()["detail"]
    other_tenant = json.dumps({"id": bad_id, "tenant": "someone-else"}).encode()
    redis_conn.hset(job_key(bad_id), "record", other_tenant)
    assert client.get(f"/v1/jobs/{bad_id}").status_code == 404  # others' jobs stay hidden
