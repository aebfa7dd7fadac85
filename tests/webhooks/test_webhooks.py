"""Webhooks on a real Valkey and a real HTTP receiver: which events become messages, signatures
(checked by the ``standardwebhooks`` package), retries with backoff, giving up, and the bounds on
a receiver that is slow, refuses, or lies outside the outbound rules."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from recalib.contract import JobCreate, JobError, JobRecord, JobStatus, Phase, Progress
from recalib.contract.webhooks import DeliveryState, Webhook
from recalib.errors import InvalidOptionError, OutboundNotAllowedError
from recalib.ids import new_job_id
from recalib.jobs import states
from recalib.jobs.records import delete_job, load, utcnow
from recalib.keys import WEBHOOK_DUE_KEY, WEBHOOK_WATCH_KEY, deliveries_key
from recalib.settings import Settings
from recalib.webhooks.deliveries import Deliveries, backoff_s, check_webhook
from recalib.webhooks.sender import WebhookSender
from recalib.webhooks.signing import WebhookSecrets, sign
from tests.live import wait_until
from tests.webhook_receiver import Receiver, new_secret, verify

MODEL = "f_" + "m" * 22
CALIB = "f_" + "c" * 22
SECRET = new_secret()


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": "redis://unused",
        "data_dir": tmp_path,
        "webhook_secrets": f"acme:{SECRET}",
        "outbound_allow_hosts": "127.0.0.1",
        "webhook_progress_interval_s": 0,
    }
    return Settings(**(values | overrides))  # type: ignore[arg-type]


def _job(conn, settings: Settings, url: str, events: list[str] | None = None) -> JobRecord:
    webhook = Webhook(url=url, **({"events": events} if events else {}))  # type: ignore[arg-type]
    record = JobRecord(
        id=new_job_id(),
        status=JobStatus.queued,
        created_at=utcnow(),
        request=JobCreate(model_file=MODEL, calibration_file=CALIB, webhook=webhook),
        tenant="acme",
    )
    assert states.create(conn, settings, record, seq=1, idem=None) is None
    return record


def _run_and_fail(conn, job_id: str, progress_events: int = 2) -> None:
    running = states.start_run(conn, job_id, None, "w1", max_attempts=2)
    assert running is not None
    for done in range(progress_events):
        progress = Progress(phase=Phase.recalibrating, done=done + 1, total=progress_events)
        states.record_progress(conn, job_id, 1, "w1", progress, event=True)
    error = JobError(type="invalid-data", message="calibration.npz: no arrays")
    assert states.finish_run(conn, job_id, 1, "w1", JobStatus.failed, error=error) is not None


def _send_until_idle(sender: WebhookSender, timeout_s: float = 30.0) -> None:
    """Sender passes until nothing is due or pending (retries included)."""

    def idle() -> bool:
        sender.run_once()
        return not sender.conn.zcard(WEBHOOK_DUE_KEY)

    wait_until(idle, timeout_s, "the webhook sender to go idle", every_s=0.2)


def test_signature_is_what_standardwebhooks_verifies() -> None:
    key = WebhookSecrets([f"*:{SECRET}"]).require("anyone")
    body = b'{"type":"job.completed"}'
    now_s = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now_s)}
    headers["webhook-signature"] = sign(key, "msg_1", now_s, body)
    from standardwebhooks.webhooks import Webhook as Verifier
    from standardwebhooks.webhooks import WebhookVerificationError

    assert Verifier(SECRET).verify(body, headers) == {"type": "job.completed"}
    with pytest.raises(WebhookVerificationError):
        Verifier(new_secret()).verify(body, headers)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("acme", "is not `tenant:whsec_<base64>`"),
        ("acme:secret-without-prefix", "is not `tenant:whsec_<base64>`"),
        ("acme:whsec_***not-base64***", "not base64"),
        ("acme:whsec_c2hvcnQ=", "5-byte key"),
        ("bad tenant:" + SECRET, "is not `tenant:whsec_<base64>`"),
    ],
)
def test_bad_secret_entries_are_named_without_echoing_them(entry: str, says: str) -> None:
    with pytest.raises(InvalidOptionError, match="RECALIB_WEBHOOK_SECRETS entry 2") as info:
        WebhookSecrets([f"*:{SECRET}", entry])
    assert says in info.value.message
    assert entry not in info.value.message


def test_secret_is_per_tenant_with_a_wildcard() -> None:
    other = new_secret()
    secrets = WebhookSecrets([f"acme:{SECRET}", f"*:{other}"])
    assert secrets.key_for("acme") != secrets.key_for("globex")
    assert secrets.key_for("globex") == WebhookSecrets([f"x:{other}"]).key_for("x")
    assert WebhookSecrets([f"acme:{SECRET}"]).key_for("globex") is None
    assert SECRET not in repr(Settings(webhook_secrets=f"acme:{SECRET}"))


def test_create_time_checks_name_the_field(tmp_path: Path) -> None:
    settings = _settings(tmp_path, outbound_allow_hosts="")
    with pytest.raises(OutboundNotAllowedError) as info:
        check_webhook(Webhook(url="http://127.0.0.1:9/x"), "acme", settings)
    assert info.value.field == "webhook.url"
    assert info.value.http_status == 422
    with pytest.raises(InvalidOptionError, match="RECALIB_WEBHOOK_SECRETS") as info:
        check_webhook(Webhook(url="https://8.8.8.8/x"), "globex", settings)
    assert info.value.field == "webhook"
    check_webhook(Webhook(url="https://8.8.8.8/x"), "acme", settings)
    check_webhook(None, "globex", settings)


def test_events_become_signed_messages_in_order(redis_conn, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    sender = WebhookSender(redis_conn, settings)
    with Receiver() as receiver:
        record = _job(redis_conn, settings, receiver.url, ["started", "progress", "completed"])
        _run_and_fail(redis_conn, record.id, progress_events=2)
        _send_until_idle(sender)
        bodies = [verify(SECRET, m) for m in receiver.messages()]
    types = [b["type"] for b in sorted(bodies, key=lambda b: b["data"]["event"]["seq"])]
    assert types == ["job.started", "job.progress", "job.progress", "job.completed"]
    completed = next(b for b in bodies if b["type"] == "job.completed")
    assert completed["data"]["job_id"] == record.id
    assert completed["data"]["job"]["status"] == "failed"
    assert completed["data"]["job"]["error"]["type"] == "invalid-data"
    assert "tenant" not in completed["data"]["job"]  # the public view, as GET /v1/jobs/{id}
    deliveries = Deliveries(redis_conn, settings).for_job(record.id)
    assert [d.state for d in deliveries] == [DeliveryState.delivered] * 4
    assert all(len(d.attempts) == 1 and d.attempts[0].status_code == 200 for d in deliveries)
    assert not redis_conn.sismember(WEBHOOK_WATCH_KEY, record.id)  # final: no longer watched
    stored = redis_conn.hvals(deliveries_key(record.id))
    assert all(SECRET[6:] not in raw.decode() for raw in stored)


def test_default_is_completed_only_and_progress_is_throttled(redis_conn, tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_progress_interval_s=3600)
    sender = WebhookSender(redis_conn, settings)
    with Receiver() as receiver:
        only_completed = _job(redis_conn, settings, receiver.url)
        throttled = _job(redis_conn, settings, receiver.url, ["progress"])
        for job in (only_completed, throttled):
            _run_and_fail(redis_conn, job.id, progress_events=5)
        _send_until_idle(sender)
        by_job: dict[str, list[str]] = {}
        for message in receiver.messages():
            body = json.loads(message.body)
            by_job.setdefault(body["data"]["job_id"], []).append(body["type"])
    assert by_job[only_completed.id] == ["job.completed"]
    # the first progress event came right after the start: within the hour, so none was sent
    assert throttled.id not in by_job


def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(
    redis_conn, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    sender = WebhookSender(redis_conn, settings)
    with Receiver(status=500) as receiver:
        record = _job(redis_conn, settings, receiver.url)
        _run_and_fail(redis_conn, record.id)
        wait_until(lambda: (sender.run_once(), len(receiver.messages()) >= 2)[1], 10, "2 tries")
        receiver.status = 200
        _send_until_idle(sender)
        ids = {m.headers["webhook-id"] for m in receiver.messages()}
        answered = [m.answered for m in receiver.messages()]
        gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    (delivery,) = Deliveries(redis_conn, settings).for_job(record.id)
    assert len(ids) == 1 and ids == {delivery.id}  # the same webhook-id on every attempt
    assert answered[:2] == [500, 500] and answered[-1] == 200
    assert delivery.state == DeliveryState.delivered
    assert [a.status_code for a in delivery.attempts] == answered
    for n, gap in enumerate(gaps, start=1):  # waits of 1, 2, 4 … s between attempts
        assert gap >= backoff_s(n) - 0.05


def test_delivery_gives_up_after_the_retry_window(redis_conn, tmp_path: Path) -> None:
    settings = _settings(tmp_path, webhook_retry_s=2)
    sender = WebhookSender(redis_conn, settings)
    with Receiver(status=503) as receiver:
        record = _job(redis_conn, settings, receiver.url)
        _run_and_fail(redis_conn, record.id)
        _send_until_idle(sender, timeout_s=15)
    (delivery,) = Deliveries(redis_conn, settings).for_job(record.id)
    assert delivery.state == DeliveryState.failed
    assert delivery.next_attempt_at is None
    assert [a.status_code for a in delivery.attempts] == [503, 503]  # at 0 s and 1 s; 3 s > 2 s


def test_refused_slow_and_forbidden_receivers_are_recorded_and_bounded(
    redis_conn, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)  # allows 127.0.0.1 only
    down = Receiver().start()
    down.stop()  # its port now refuses connections
    with Receiver(delay_s=5.0) as slow:
        jobs = {
            "refused": _job(redis_conn, settings, down.url),
            "slow": _job(redis_conn, settings, slow.url),
            "forbidden": _job(redis_conn, settings, "http://127.0.0.2:9/hooks"),
        }
        for job in jobs.values():
            _run_and_fail(redis_conn, job.id)
        started = time.monotonic()
        assert WebhookSender(redis_conn, settings, timeout_s=1.0).run_once() == 3
        pass_s = time.monotonic() - started
    attempts = {
        name: Deliveries(redis_conn, settings).for_job(job.id)[0].attempts
        for name, job in jobs.items()
    }
    assert pass_s < 3.0  # the three attempts ran at once, the slow one cut at 1 s
    assert "ConnectError" in (attempts["refused"][0].error or "")
    assert attempts["slow"][0].error == "no answer within 1 s"
    assert 900 <= attempts["slow"][0].duration_ms < 2500
    assert "RECALIB_OUTBOUND_ALLOW_HOSTS" in (attempts["forbidden"][0].error or "")
    assert all(a[0].status_code is None for a in attempts.values())


def test_a_deleted_job_takes_its_deliveries_along(redis_conn, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    sender = WebhookSender(redis_conn, settings)
    record = _job(redis_conn, settings, "http://127.0.0.1:9/unused")
    _run_and_fail(redis_conn, record.id)
    sender.deliveries.plan_all()
    assert redis_conn.zcard(WEBHOOK_DUE_KEY) == 1
    stored = load(redis_conn, record.id)
    assert stored is not None
    delete_job(redis_conn, stored.record)
    assert sender.run_once() == 0
    assert redis_conn.zcard(WEBHOOK_DUE_KEY) == 0
    assert not redis_conn.exists(deliveries_key(record.id))
