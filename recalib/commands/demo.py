"""``recalib demo``: the digits domain-shift case end to end through the REST API.

Trains a small BN CNN on scikit-learn's digits (shipped with scikit-learn, nothing downloaded),
builds a shifted target domain (a "new sensor": lower contrast, brighter, noisier), starts
``recalib serve`` (embedded Valkey + API + one worker) as a child process, submits the job with
:class:`recalib.client.RecalibClient`, prints before/after accuracy and where the recalibrated
checkpoint is, and stops the server it started (also on errors, Ctrl-C and SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from recalib.commands import require
from recalib.commands.serve import _exit_on_signal, _signals_ignored
from recalib.errors import EXIT_JOB_FAILED, ServiceUnavailableError

if TYPE_CHECKING:
    from recalib.contract import JobPublic

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
SERVE_LOG = "serve.log"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("recalib-data") / "demo",
        help="Where the demo writes its inputs, the service data and the results "
        "(default: recalib-data/demo).",
    )
    parser.add_argument("--port", type=int, help="API port (default: a free one).")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="Leave the API, worker and Valkey running after the demo (explore /docs, submit "
        "more jobs) until Ctrl-C.",
    )


def main(args: argparse.Namespace) -> int:
    require("worker", "demo")
    require("service", "demo")
    from worker.digits import accuracy, make_digits_case, write_demo_files

    signal.signal(signal.SIGTERM, _exit_on_signal)  # so the server below is stopped on SIGTERM
    # Ctrl-C must work even when started in the background, where SIGINT comes ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    root = args.data_dir.resolve()
    port = args.port or _free_port()
    _say(f"1/4 starting recalib serve on port {port} (embedded Valkey, API, 1 worker) in {root}")
    with _serve(root / "service", port) as (url, server):
        _say("2/4 training a BN CNN on scikit-learn's digits (source domain), meanwhile")
        case = make_digits_case()
        inputs = write_demo_files(case, root / "inputs")
        clean_top1 = accuracy(case.model, *case.evaluation)
        _wait_ready(url, server, root / "service" / SERVE_LOG)
        _say(f"3/4 submitting the job to {url} through the REST API")
        job, downloaded = _submit(url, inputs, root / "out")
        code = _print_results(job, downloaded, clean_top1, time.monotonic() - started)
        if args.keep_running:
            _say(f"the API stays up on {url} (docs: {url}/docs); Ctrl-C stops everything")
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
    return code


def _submit(url: str, inputs: dict[str, Path], out_dir: Path) -> tuple[JobPublic, dict[str, Path]]:
    """Upload the three files, create the job, follow it; download its artifacts on success."""
    from recalib.client import RecalibClient

    with RecalibClient(url) as client:
        model = client.upload_file(inputs["model"])
        calibration = client.upload_file(inputs["calibration"])
        evaluation = client.upload_file(inputs["evaluation"])
        job = client.create_job(model.id, calibration.id, eval_file=evaluation.id)
        _say(f"   job {job.id}: {job.status}")
        shown = [str(job.status)]

        def show(current: JobPublic) -> None:
            # A phase that only repeats the status (queued, done) adds nothing to it.
            status, phase = str(current.status), str(current.progress.phase)
            line = status if phase in (status, "queued", "done") else f"{status}: {phase}"
            if line != shown[-1]:
                shown.append(line)
                _say(f"   {line}")

        job = client.wait(job.id, on_progress=show)
        if job.status != "succeeded":
            return job, {}
        return job, {
            which: client.download(job.id, which, out_dir) for which in ("checkpoint", "report")
        }


def _print_results(
    job: JobPublic, downloaded: dict[str, Path], clean_top1: float, elapsed_s: float
) -> int:
    report = job.result
    if report is None or report.before is None or report.after is None:
        reason = job.error.message if job.error else "no report"
        _say(f"job {job.id} ended {job.status}: {reason}")
        return EXIT_JOB_FAILED
    _say("4/4 results (top-1 accuracy on held-out target-domain digits)")
    _say(f"   clean source domain, original stats : {clean_top1:.3f}")
    _say(f"   shifted target, before recalibration : {report.before.top1:.3f}")
    _say(f"   shifted target, after recalibration  : {report.after.top1:.3f}")
    _say(
        f"   verdict: {report.verdict}; {report.calibration.samples} unlabeled target samples; "
        f"{report.bn_layers} BN layers; worker device {report.device}; "
        f"job {report.timings_s.get('total', 0.0):.1f} s, demo {elapsed_s:.0f} s"
    )
    _say(f"   recalibrated checkpoint: {downloaded['checkpoint']}")
    _say(f"   report: {downloaded['report']}")
    return 0


@contextlib.contextmanager
def _serve(data_dir: Path, port: int) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``recalib serve`` in its own session with the embedded Valkey (it starts while the caller
    goes on: see :func:`_wait_ready`); stopped on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RECALIB_REDIS_URL"}
    env |= {"RECALIB_DATA_DIR": str(data_dir), "RECALIB_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "recalib.cli", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir)]
    log_path = data_dir / SERVE_LOG
    with log_path.open("ab") as log:
        # Its own session: a terminal's Ctrl-C reaches only the demo, which stops serve in order.
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_term_with_parent,
        )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        _stop(proc)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until ``/readyz`` answers 200 and lists a live worker (torch imported, queue listened to)."""
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            ready = httpx.get(f"{url}/readyz", timeout=2.0)
            if ready.status_code == 200 and ready.json().get("workers"):
                return
        time.sleep(0.25)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise ServiceUnavailableError(
        f"recalib serve did not become ready in {READY_TIMEOUT_S:.0f} s; {log_path} ends:\n{tail}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets serve stop its API, worker and Valkey in order; SIGKILL its session after."""
    with _signals_ignored():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _term_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the demo dies without stopping it
    (SIGKILL, out of memory), so serve still shuts its worker and Valkey down."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
