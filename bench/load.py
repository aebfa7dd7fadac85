"""Sustained load: N clients submit jobs and poll them to the end, for a bounded time.

    python -m bench.load                         # 60 s, 32 clients, own stack with 2 workers
    python -m bench.load --duration-s 20 --clients 8
    python -m bench.load --server http://host:8000   # against a running service

The load runs in a second process (threads with keep-alive clients) on loopback. Each client
loops: ``POST /v1/jobs`` (a small digits job), then ``GET /v1/jobs/{id}`` every ``--poll-s``
until the job ends. After the time is up, clients finish the job in hand (bounded drain), then
every created job is checked against the server: zero errors and zero lost jobs are the bar.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, percentile, write_results
from bench.stack import ServiceStack

JOB_OPTIONS = {"batch_size": 64, "max_samples": 128, "device": "cpu"}


def _client(url: str, body: dict, until: float, drain_s: float, poll_s: float, out: list) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() < until:
            record: dict[str, Any] = {"polls": [], "errors": []}
            start = job_start = time.perf_counter()
            try:
                created = http.post("/v1/jobs", json=body)
            except httpx.TransportError as exc:
                out.append(record | {"errors": [f"submit: {exc!r}"]})
                continue
            record["submit_s"] = time.perf_counter() - start
            if created.status_code != 202:
                out.append(record | {"errors": [f"submit: HTTP {created.status_code}"]})
                continue
            job_id = created.json()["id"]
            record["id"] = job_id
            deadline = max(until, time.monotonic()) + drain_s
            status = "queued"
            while time.monotonic() < deadline:
                time.sleep(poll_s)
                start = time.perf_counter()
                try:
                    polled = http.get(f"/v1/jobs/{job_id}")
                except httpx.TransportError as exc:
                    record["errors"].append(f"poll: {exc!r}")
                    continue
                record["polls"].append(time.perf_counter() - start)
                if polled.status_code != 200:
                    record["errors"].append(f"poll: HTTP {polled.status_code}")
                    continue
                status = polled.json()["status"]
                if status in ("succeeded", "failed", "cancelled"):
                    break
            record["status"] = status
            record["job_s"] = time.perf_counter() - job_start
            out.append(record)


def _load_process(url: str, body: dict, args: dict, queue: Any) -> None:
    results: list[dict] = []
    until = time.monotonic() + args["duration_s"]
    threads = [
        threading.Thread(
            target=_client, args=(url, body, until, args["drain_s"], args["poll_s"], results)
        )
        for _ in range(args["clients"])
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put({"results": results, "elapsed_s": time.perf_counter() - started})


def prepare(url: str, work: Path) -> dict:
    """Upload the digits model and calibration data once; the job body every client sends."""
    from recalib.client import RecalibClient
    from worker.digits import make_digits_case, write_demo_files

    files = write_demo_files(make_digits_case(seed=0), work / "inputs")
    with RecalibClient(url) as client:
        model = client.upload_file(files["model"]).id
        calib = client.upload_file(files["calibration"]).id
    return {"model_file": model, "calibration_file": calib, "options": JOB_OPTIONS}


def verify(url: str, created: list[str]) -> dict[str, int]:
    """How each created job ended, as the server tells it now ('missing' = lost)."""
    outcome: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for job_id in created:
            response = http.get(f"/v1/jobs/{job_id}")
            status = response.json()["status"] if response.status_code == 200 else "missing"
            outcome[status] = outcome.get(status, 0) + 1
    return outcome


def run_load(url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    body = prepare(url, work)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    params = {k: getattr(args, k) for k in ("duration_s", "drain_s", "poll_s", "clients")}
    proc = ctx.Process(target=_load_process, args=(url, body, params, queue))
    proc.start()
    load = queue.get()
    proc.join()
    results, elapsed = load["results"], load["elapsed_s"]
    created = [r["id"] for r in results if "id" in r]
    submits = [r["submit_s"] * 1000 for r in results if "submit_s" in r]
    polls = [p * 1000 for r in results for p in r["polls"]]
    errors = [e for r in results for e in r["errors"]]
    job_times = [r["job_s"] for r in results if r.get("status") == "succeeded"] or [0.0]
    outcome = verify(url, created)
    return {
        "duration_s": args.duration_s,
        "clients": args.clients,
        "elapsed_s": elapsed,
        "jobs_created": len(created),
        "jobs_by_final_status": outcome,
        "lost_jobs": outcome.get("missing", 0),
        "unfinished_after_drain": sum(
            1
            for r in results
            if r.get("status") not in ("succeeded", "failed", "cancelled") and "id" in r
        ),
        "errors": len(errors),
        "error_examples": errors[:5],
        "jobs_per_s": outcome.get("succeeded", 0) / elapsed,
        "requests": len(submits) + len(polls),
        "requests_per_s": (len(submits) + len(polls)) / elapsed,
        "job_p50_s": percentile(job_times, 50),
        "job_p99_s": percentile(job_times, 99),
        "submit_p50_ms": percentile(submits, 50),
        "submit_p99_ms": percentile(submits, 99),
        "poll_p50_ms": percentile(polls, 50),
        "poll_p99_ms": percentile(polls, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--drain-s", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--poll-s", type=float, default=0.25)
    parser.add_argument("--server", help="Use this running service instead of starting one.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recalib-load-") as tmp:
        work = Path(tmp)
        if args.server:
            result = run_load(args.server, work, args)
        else:
            with ServiceStack(work / "stack", workers=args.workers) as stack:
                result = run_load(stack.url, work, args)
            result["workers"] = args.workers
    result["machine"] = machine()
    write_results(result, args.out)


if __name__ == "__main__":
    main()
