"""Service benchmarks: job overhead vs the engine, small-job throughput, upload, API latency.

Run from the repository root (2 cores are enough; numbers scale with the machine):

    python -m bench.service                    # all four parts
    python -m bench.service --parts job,small --repeats 5
    python -m bench.service --parts upload --upload-mib 1024

(a) ``job``: wall time create→succeeded of one 2,000-sample digits job through the service
    (HTTP + Redis + worker), warm workers and forking workers, vs ``worker.pipeline.run_job``
    in-process on the same files (warm and cold); the ``load`` phase of repeat jobs against the
    first (:mod:`bench.jobs`).
(small) ``small``: 20 small jobs (one model, 20 target sets) on 2 workers, jobs per minute,
    warm workers vs forking workers in the same run (:mod:`bench.jobs`).
(b) ``upload``: peak RSS of the API process (from /proc) while a 1 GiB file is uploaded, and the
    upload throughput vs a plain read/write copy of the same bytes on the same disk.
(c) ``latency``: p50/p99 of ``POST /v1/jobs`` and ``GET /v1/jobs/{id}`` with 32 concurrent
    clients (4 processes × 8 threads, keep-alive), no worker consuming.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    CHUNK,
    PeakRss,
    machine,
    percentile,
    upload_through_api,
    write_random_file,
    write_results,
)
from bench.jobs import bench_job, bench_small_jobs
from bench.stack import ServiceStack, tree_cpu_s

# ---------------------------------------------------------------------------------------------
# (b) upload memory and throughput
# ---------------------------------------------------------------------------------------------


def _plain_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    with src.open("rb") as fin, dst.open("wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
    return time.perf_counter() - start


def bench_upload(work: Path, size_mib: int, rounds: int) -> dict[str, Any]:
    """Alternate upload and plain copy ``rounds`` times (dirty pages synced before each)."""
    size = size_mib * CHUNK
    with ServiceStack(work / "stack", workers=0) as stack:
        big = stack.work_dir / "data" / "big.bin"  # same filesystem as the uploads
        write_random_file(big, size)
        pid = stack.api.pid if stack.api else 0
        httpx.post(f"{stack.url}/v1/files", params={"filename": "warm.bin"}, content=b"w" * CHUNK)
        upload_s, copy_s = [], []
        with PeakRss(pid) as rss:
            for _ in range(rounds):
                os.sync()
                copy_s.append(_plain_copy(big, big.with_suffix(".copy")))
                big.with_suffix(".copy").unlink()
                os.sync()
                upload_s.append(upload_through_api(stack.url, big, size, timeout_s=600))
    upload, copy = statistics.median(upload_s), statistics.median(copy_s)
    return {
        "bytes": size,
        "rounds": rounds,
        "idle_rss_mib": rss.idle_kib / 1024,
        "peak_rss_mib": rss.peak_kib / 1024,
        "vm_hwm_mib": rss.hwm_kib / 1024,
        "rss_growth_mib": (max(rss.peak_kib, rss.hwm_kib) - rss.idle_kib) / 1024,
        "upload_s": upload_s,
        "copy_s": copy_s,
        "upload_mib_s": size_mib / upload,
        "copy_mib_s": size_mib / copy,
        "upload_vs_copy_time": upload / copy,
    }


# ---------------------------------------------------------------------------------------------
# (c) submit / status latency under 32 concurrent clients
# ---------------------------------------------------------------------------------------------


class KeepAliveClient:
    """A lean keep-alive JSON client (http.client): little client CPU per request, so the
    latency measured is mostly the server's, even with the load generator on the same cores."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self._conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self._conn.request(method, path, body=body, headers=headers)
        response = self._conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None

    def close(self) -> None:
        self._conn.close()


def _client_process(url: str, body: dict[str, Any], threads: int, rounds: int, queue: Any) -> None:
    results: list[tuple[str, float, int]] = []
    lock = threading.Lock()

    def client_loop() -> None:
        local: list[tuple[str, float, int]] = []
        http = KeepAliveClient(url)
        payload = json.dumps(body).encode()
        for _ in range(rounds):
            start = time.perf_counter()
            code, created = http.request("POST", "/v1/jobs", payload)
            local.append(("submit", time.perf_counter() - start, code))
            start = time.perf_counter()
            code, _ = http.request("GET", f"/v1/jobs/{created['id']}")
            local.append(("status", time.perf_counter() - start, code))
        http.close()
        with lock:
            results.extend(local)

    pool = [threading.Thread(target=client_loop) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    queue.put(results)


def run_clients(url: str, body: dict, clients: int, rounds: int, procs: int = 4) -> list:
    """``clients`` concurrent keep-alive clients over ``procs`` processes; (kind, s, status)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [
        ctx.Process(target=_client_process, args=(url, body, clients // procs, rounds, queue))
        for _ in range(procs)
    ]
    for proc in workers:
        proc.start()
    results = [item for _ in workers for item in queue.get()]
    for proc in workers:
        proc.join()
    return results


def summarize(results: list[tuple[str, float, int]], elapsed_s: float | None = None) -> dict:
    summary: dict[str, Any] = {}
    for kind in sorted({kind for kind, _, _ in results}):
        latencies = [s * 1000 for k, s, _ in results if k == kind]
        errors = sum(1 for k, _, code in results if k == kind and code >= 400)
        summary[kind] = {
            "requests": len(latencies),
            "errors": errors,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies),
        }
        if elapsed_s:
            summary[kind]["per_s"] = len(latencies) / elapsed_s
    return summary


def bench_latency(work: Path, clients: int, rounds: int, api_workers: int) -> dict[str, Any]:
    with ServiceStack(work / "stack", workers=0, api_workers=api_workers) as stack:
        upload = httpx.post(f"{stack.url}/v1/files", params={"filename": "m.pt2"}, content=b"m")
        file_id = upload.json()["id"]
        body = {"model_file": file_id, "calibration_file": file_id}
        run_clients(stack.url, body, clients, 3)  # warm-up: connections, imports
        pid = stack.api.pid if stack.api else 0
        cpu_before, start = tree_cpu_s(pid), time.perf_counter()
        results = run_clients(stack.url, body, clients, rounds)
        elapsed, api_cpu_s = time.perf_counter() - start, tree_cpu_s(pid) - cpu_before
    return {
        "clients": clients,
        "rounds": rounds,
        "api_workers": api_workers,
        "elapsed_s": elapsed,
        "api_cpu_ms_per_request": api_cpu_s * 1000 / len(results),
        "api_cpu_share": api_cpu_s / elapsed,
    } | summarize(results, elapsed)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="job,small,upload,latency")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small-jobs", type=int, default=20, help="jobs of the small part")
    parser.add_argument("--small-samples", type=int, default=500, help="samples per small job")
    parser.add_argument("--small-workers", type=int, default=2)
    parser.add_argument("--small-rounds", type=int, default=2, help="warm/fork stacks each")
    parser.add_argument("--upload-mib", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20, help="submit+status pairs per client")
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn --workers (latency)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of every contender (OMP_NUM_THREADS: this process, the cold engine, "
        "the stacks); on a shared machine 1 keeps oversubscribed thread pools from swamping "
        "the comparison",
    )
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before anything imports torch
    results: dict[str, Any] = {"machine": machine(), "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="recalib-bench-") as tmp:
        work = Path(tmp)
        parts = args.parts.split(",")
        if "job" in parts:
            results["job"] = bench_job(work / "job", args.samples, args.repeats)
        if "small" in parts:
            results["small"] = bench_small_jobs(
                work / "small",
                args.small_jobs,
                args.small_samples,
                args.small_workers,
                args.small_rounds,
            )
        if "upload" in parts:
            results["upload"] = bench_upload(work / "upload", args.upload_mib, args.repeats)
        if "latency" in parts:
            results["latency"] = bench_latency(
                work / "latency", args.clients, args.rounds, args.api_workers
            )
    write_results(results, args.out)


if __name__ == "__main__":
    main()
