"""Escape attempts from inside a job's model, through the real service (API, warm worker, Valkey).

Two tenants: ``bob`` uploads a file holding a marker; ``alice`` submits hostile models, delivered
as a pickle (the operator opted in to unpickling), a ``.pt2`` that breaks out of the code
``program.module()`` generates, ``arch`` code of a state_dict, and TorchScript using
``torch.from_file``. Each tries one escape: reading bob's upload, Valkey's append-only file,
``/proc/1/environ`` and the worker's environment; writing outside its output directory; a TCP
connection to the Redis port and to the API; ``execve`` of a shell; ``fork``. Each job must fail
with an error naming the violation (never ``internal-error``), the next job must succeed, and no
byte of bob's file may be in any of alice's artifacts.

The suite runs twice: with the format allowlists on (the vetting refuses the ``.pt2`` and the
TorchScript before anything runs) and off (``RECALIB_VET_MODELS=false``): the sandbox alone holds.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import httpx
import numpy as np
import pytest

from recalib import layout
from tests import sandbox_attacks as attacks
from tests.live import Stack, upload, wait_for_job

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "cancelled"}
ALICE, BOB = "alice-" + secrets.token_hex(8), "bob-" + secrets.token_hex(8)
WORKER_SECRET = "worker-secret-" + secrets.token_hex(8)
MARKER = b"BOB-PRIVATE-" + secrets.token_hex(8).encode()


@pytest.fixture(scope="module", params=["vetted", "unvetted"])
def stack(request, live_redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    env = {
        "RECALIB_API_KEYS": f"alice:{ALICE},bob:{BOB}",
        "RECALIB_ALLOW_UNSAFE_PICKLE": "true",
        "RECALIB_ARCH_ALLOWLIST": "tests.sandbox_attacks",
        "RECALIB_VET_MODELS": "true" if request.param == "vetted" else "false",
        "AWS_SECRET_ACCESS_KEY": WORKER_SECRET,  # a secret the worker holds
    }
    with Stack(live_redis_url, tmp_path_factory.mktemp(request.param), **env) as stack:
        stack.start_api()
        stack.start_worker("w1")
        stack.vetted = request.param == "vetted"  # type: ignore[attr-defined]
        yield stack


def _client(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def world(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Bob's private upload, alice's calibration data, and the paths and ports to attack."""
    tmp = tmp_path_factory.mktemp("world")
    private = tmp / "private.bin"
    private.write_bytes(MARKER * 64)
    data = tmp / "calibration.npz"
    np.savez(data, inputs=np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    with _client(stack, BOB) as bob, _client(stack, ALICE) as alice:
        bob_file = upload(bob, private)
        calibration = upload(alice, data)
    valkey_dir = Path(stack.conn.config_get("dir")["dir"])
    aof = sorted(p for p in valkey_dir.rglob("*") if p.is_file())
    assert aof, f"no Valkey file under {valkey_dir}"
    return {
        "bob_file": str(layout.file_path(stack.data_dir, bob_file)),
        "valkey_file": str(aof[0]),
        "worker_environ": f"/proc/{stack.workers['w1'].pid}/environ",
        "outside": str(stack.data_dir / "escaped.txt"),
        "calibration": calibration,
        "tmp": tmp,
    }


def _attacks(world: dict, stack: Stack) -> dict[str, tuple[str, str]]:
    """name → (source, what the error must name)."""
    redis_port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    api_port = int(stack.url.rsplit(":", 1)[1])
    return {
        "read-other-tenant": (attacks.attack_source("read", world["bob_file"]), world["bob_file"]),
        "read-valkey": (attacks.attack_source("read", world["valkey_file"]), world["valkey_file"]),
        "read-proc1-environ": (attacks.attack_source("read", "/proc/1/environ"), "/proc/1/environ"),
        "read-worker-environ": (
            attacks.attack_source("read", world["worker_environ"]),
            world["worker_environ"],
        ),
        "write-outside": (attacks.attack_source("write", world["outside"]), world["outside"]),
        "tcp-redis": (attacks.attack_source("tcp", port=redis_port), "opening a socket (AF_INET)"),
        "tcp-api": (attacks.attack_source("tcp", port=api_port), "opening a socket (AF_INET)"),
        "execve": (attacks.attack_source("exec"), "running a program (execve)"),
        "system": (attacks.attack_source("system"), "starting a process"),
        "fork": (attacks.attack_source("fork"), "starting a process (fork)"),
    }


def _run(stack: Stack, body: dict) -> dict:
    with _client(stack, ALICE) as alice:
        created = alice.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        return wait_for_job(alice, created.json()["id"], FINAL, timeout_s=120)


def _assert_contained(stack: Stack, done: dict, names: str) -> None:
    assert done["status"] == "failed", done
    error = done["error"]
    assert error["type"] != "internal-error", error
    assert names in error["message"], error
    assert WORKER_SECRET not in error["message"]
    assert not Path(stack.data_dir / "escaped.txt").exists()
    assert not Path("/tmp/recalib-escape-system").exists()
    for path in layout.job_dir(stack.data_dir, done["id"]).rglob("*"):
        if path.is_file():
            assert MARKER not in path.read_bytes(), path


def _upload_model(stack: Stack, path: Path) -> str:
    with _client(stack, ALICE) as alice:
        return upload(alice, path)


VECTORS = ("pickle", "pt2", "arch")


@pytest.mark.parametrize("vector", VECTORS)
def test_every_escape_from_python_fails_in_the_sandbox(
    stack: Stack, world: dict, vector: str
) -> None:
    for name, (source, names) in _attacks(world, stack).items():
        model = world["tmp"] / f"{vector}-{name}"
        body_extra: dict = {}
        if vector == "pickle":
            model_id = _upload_model(stack, attacks.pickle_model(model.with_suffix(".pt"), source))
        elif vector == "pt2":
            model_id = _upload_model(stack, attacks.pt2_model(model.with_suffix(".pt2"), source))
        else:
            weights = attacks.state_dict_for_hostile_net(model.with_suffix(".pt"))
            model_id = _upload_model(stack, weights)
            body_extra = {"arch": "tests.sandbox_attacks:HostileNet",
                          "arch_kwargs": {"source": source}}  # fmt: skip
        body = {"model_file": model_id, "calibration_file": world["calibration"], **body_extra}
        done = _run(stack, body)
        if vector == "pt2" and stack.vetted:  # type: ignore[attr-defined]
            assert done["status"] == "failed" and done["error"]["type"] == "invalid-model", done
            assert "name" in done["error"]["message"], done["error"]
            continue
        _assert_contained(stack, done, names)


@pytest.mark.parametrize("target", ["bob_file", "valkey_file", "worker_environ"])
def test_torchscript_cannot_read_files_outside_its_job(stack: Stack, world: dict, target) -> None:
    model = attacks.torchscript_reader(world["tmp"] / f"reader-{target}.ts", world[target])
    done = _run(stack, {"model_file": _upload_model(stack, model),
                        "calibration_file": world["calibration"]})  # fmt: skip
    if stack.vetted:  # type: ignore[attr-defined]
        assert done["status"] == "failed" and done["error"]["type"] == "invalid-model", done
        assert "aten::from_file" in done["error"]["message"], done["error"]
    else:
        _assert_contained(stack, done, world[target])


def test_torchscript_cannot_overwrite_a_file(stack: Stack, world: dict) -> None:
    victim = Path(world["bob_file"])
    before = victim.read_bytes()
    model = attacks.torchscript_writer(world["tmp"] / "writer.ts", str(victim))
    done = _run(stack, {"model_file": _upload_model(stack, model),
                        "calibration_file": world["calibration"]})  # fmt: skip
    assert done["status"] == "failed", done
    assert done["error"]["type"] != "internal-error", done["error"]
    assert victim.read_bytes() == before


def test_the_job_sees_no_secret_in_its_environment(stack: Stack, world: dict) -> None:
    source = attacks.attack_source("environment")
    model = attacks.pickle_model(world["tmp"] / "environment.pt", source)
    done = _run(stack, {"model_file": _upload_model(stack, model),
                        "calibration_file": world["calibration"]})  # fmt: skip
    assert done["status"] == "failed", done
    message = done["error"]["message"]
    assert "ENVIRONMENT" in message, message  # the payload ran and reported what it saw
    for leaked in (WORKER_SECRET, ALICE, BOB, "RECALIB_API_KEYS", "RECALIB_REDIS_URL",
                   "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        assert leaked not in message


def test_the_next_job_runs_after_the_attacks(stack: Stack, world: dict) -> None:
    weights = attacks.state_dict_for_hostile_net(world["tmp"] / "honest.pt")
    body = {"model_file": _upload_model(stack, weights), "calibration_file": world["calibration"],
            "arch": "tests.sandbox_attacks:HostileNet"}  # fmt: skip
    done = _run(stack, body)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["sandbox"]["level"] == "strict"
    assert stack.workers["w1"].alive()
    with _client(stack, ALICE) as alice:  # the worker registry, as /readyz shows it
        workers = alice.get("/readyz").json()["workers"]
    assert len(workers) == 1 and re.fullmatch(
        r"strict \(landlock-abi\d+, seccomp, netns\)", workers[0]["sandbox"]
    ), workers
