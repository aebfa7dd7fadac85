"""recalib.inputs.outbound: only public addresses unless allowed; redirects are checked too."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from recalib.errors import InvalidOptionError, OutboundNotAllowedError
from recalib.inputs.outbound import OutboundPolicy, guarded_client

NOT_PUBLIC = [
    "http://127.0.0.1/x",
    "http://localhost:8080/x",
    "http://[::1]/x",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "https://10.1.2.3/model.pt2",
    "https://192.168.0.10/model.pt2",
    "https://172.16.5.4/model.pt2",
    "https://100.64.0.1/model.pt2",  # carrier-grade NAT
    "http://[::ffff:127.0.0.1]/x",  # IPv4-mapped loopback
    "http://[fd00::1]/x",  # unique local
    "http://0.0.0.0/x",
    "http://224.0.0.1/x",
]


@pytest.mark.parametrize("url", NOT_PUBLIC)
def test_non_public_addresses_are_refused_by_default(url: str) -> None:
    with pytest.raises(OutboundNotAllowedError, match="RECALIB_OUTBOUND_ALLOW_HOSTS") as info:
        OutboundPolicy().check_url(url, field="model_uri")
    assert info.value.field == "model_uri"
    assert info.value.http_status == 422


def test_public_addresses_pass() -> None:
    OutboundPolicy().check_url("https://8.8.8.8/model.pt2", field="model_uri")
    OutboundPolicy().check_url("https://[2606:4700:4700::1111]/m.pt2", field="model_uri")


def test_the_operator_allows_hosts_and_networks() -> None:
    policy = OutboundPolicy(["localhost", "10.0.0.0/8", " "])
    policy.check_url("http://localhost:9000/bucket/x", field="webhook.url")
    policy.check_url("https://10.9.8.7/x", field="webhook.url")
    with pytest.raises(OutboundNotAllowedError):
        policy.check_url("https://192.168.1.1/x", field="webhook.url")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://8.8.8.8/x", "https:///nohost", "x"])
def test_other_schemes_and_malformed_urls_are_invalid(url: str) -> None:
    with pytest.raises(InvalidOptionError):
        OutboundPolicy().check_url(url, field="eval_uri")


class _Redirect(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://127.0.0.2:9/secret")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        del args


@pytest.fixture
def redirecting_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/model.pt2"
    server.shutdown()
    server.server_close()


def test_a_redirect_into_a_refused_address_is_refused(redirecting_server: str) -> None:
    policy = OutboundPolicy(["127.0.0.1/32"])  # the first host is allowed, 127.0.0.2 is not
    with (
        guarded_client(policy, field="calibration_uri", follow_redirects=True) as client,
        pytest.raises(OutboundNotAllowedError, match=r"127\.0\.0\.2"),
    ):
        client.get(redirecting_server)
    with guarded_client(policy, field="calibration_uri") as client:
        assert client.get(redirecting_server).status_code == 302  # allowed host, no follow
