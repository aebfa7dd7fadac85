"""``recalib demo``: the digits domain-shift case end to end through the REST API.

Trains a small BN CNN on scikit-learn's digits (shipped with scikit-learn, nothing downloaded),
builds a shifted target domain (a "new sensor": lower contrast, brighter, noisier), starts
``recalib serve`` (embedded Valkey + API + one worker) as a child process, submits the job with
:class:`recalib.client.RecalibClient`, prints before/after accuracy and where the recalibrated
checkpoint is, and stops the server it started (also on errors and Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from recalib.errors import ServiceUnavailableError

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("recalib-demo"),
        help="Where the demo writes its inputs, the service data and the results.",
    )
    parser.add_argument("--port", type=int, help="API port (default: a free one).")


def main(args: argparse.Namespace) -> int:
    from worker.digits import accuracy, make_digits_case, write_demo_files

    root = args.data_dir.resolve()
    _say(f"1/4 training a BN CNN on scikit-learn's digits (source domain) in {root}")
    case = make_digits_case()
    inputs = write_demo_files(case, root / "inputs")
    clean = accuracy(case.model, *case.evaluation)
    port = args.port or _free_port()
    _say(f"2/4 starting recalib serve on port {port} (embedded Valkey, API, 1 worker)")
    with _serve(root / "service", port) as server_url:
        _say("3/4 submitting the job through the REST API")
        job = _submit(server_url, inputs, root / "out")
    report = job.result
    if report is None or report.before is None or report.after is None:
        _say(f"job {job.id} ended {job.status}: {job.error.message if job.error else '?'}")
        return 4
    _say("4/4 results (top-1 accuracy on held-out target-domain digits)")
    print(f"   clean source domain, original stats : {clean:.3f}")
    print(f"   shifted target, before recalibration : {report.before.top1:.3f}")
    print(f"   shifted target, after recalibration  : {report.after.top1:.3f}")
    print(f"   verdict: {report.verdict}; {report.calibration.samples} unlabeled target samples")
    print(f"   recalibrated checkpoint: {root / 'out' / report.checkpoint.file}")
    print(f"   report: {root / 'out' / 'report.json'}")
    return 0


def _submit(server_url: str, inputs: dict[str, Path], out_dir: Path):  # -> JobPublic
    from recalib.client import RecalibClient

    with RecalibClient(server_url) as client:
        model = client.upload_file(inputs["model"])
        calibration = client.upload_file(inputs["calibration"])
        evaluation = client.upload_file(inputs["evaluation"])
        job = client.create_job(model.id, calibration.id, eval_file=evaluation.id)
        _say(f"   job {job.id} queued")
        last = [None]

        def show(current) -> None:
            phase = current.progress.phase
            if phase != last[0]:
                last[0] = phase
                _say(f"   {current.status}: {phase}")

        job = client.wait(job.id, on_progress=show)
        if job.status == "succeeded":
            out_dir.mkdir(parents=True, exist_ok=True)
            client.download(job.id, "checkpoint", out_dir)
            client.download(job.id, "report", out_dir)
        return job


@contextlib.contextmanager
def _serve(data_dir: Path, port: int) -> Iterator[str]:
    """``recalib serve`` in its own session with the embedded Valkey; stopped on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RECALIB_REDIS_URL"}
    env |= {"RECALIB_DATA_DIR": str(data_dir), "RECALIB_LOG_LEVEL": "WARNING"}
    log_path = data_dir / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recalib.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log_path)
        yield url
    finally:
        _stop(proc)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(httpx.HTTPError):
            ready = httpx.get(f"{url}/readyz", timeout=2.0)
            if ready.status_code == 200 and ready.json().get("workers"):
                return
        time.sleep(0.25)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise ServiceUnavailableError(f"recalib serve did not become ready; its log ends:\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets serve stop its API, worker and Valkey in order; SIGKILL the session after."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(message: str) -> None:
    print(message, flush=True)
