"""Service benchmarks: job overhead vs the engine, upload memory/throughput, API latency.

Run from the repository root (2 cores are enough; numbers scale with the machine):

    python -m bench.service                    # all three parts
    python -m bench.service --parts upload --upload-mib 1024

(a) ``job``: wall time create→succeeded of one 2,000-sample digits job through the service
    (HTTP + Redis + RQ worker) vs ``worker.pipeline.run_job`` in-process on the same files.
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
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.stack import REPO_ROOT, ServiceStack, rss_kib, tree_cpu_s

CHUNK = 1024 * 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ---------------------------------------------------------------------------------------------
# (a) job wall time vs the engine alone
# ---------------------------------------------------------------------------------------------


def make_job_files(out_dir: Path, samples: int) -> dict[str, Path]:
    """The digits model and a ``samples``-sample shifted calibration set (+ the eval split)."""
    import numpy as np

    from worker.digits import load_digits_arrays, make_digits_case, shift_domain, write_demo_files

    files = write_demo_files(make_digits_case(seed=0), out_dir)
    inputs, labels = load_digits_arrays()
    idx = np.arange(samples) % len(inputs)
    files["calibration"] = out_dir / f"calib-{samples}.npz"
    np.savez(files["calibration"], inputs=shift_domain(inputs[idx], seed=3), labels=labels[idx])
    return files


_COLD_ENGINE = """
import sys, time
from recalib.contract import JobSpec
from worker.pipeline import run_job  # imports torch: not timed
spec = JobSpec.model_validate_json(sys.argv[1])
start = time.perf_counter()
run_job(spec)
print(time.perf_counter() - start)
"""


def _spec(files: dict[str, Path], out_dir: Path) -> Any:
    from recalib.contract import JobSpec

    return JobSpec(
        model_path=str(files["model"]),
        calibration_path=str(files["calibration"]),
        eval_path=str(files["evaluation"]),
        out_dir=str(out_dir),
    )


def _cold_engine(files: dict[str, Path], out_dir: Path) -> float:
    spec = _spec(files, out_dir).model_dump_json()
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-c", _COLD_ENGINE, spec]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def bench_job(work: Path, samples: int, repeats: int) -> dict[str, Any]:
    """Service create→succeeded vs run_job in-process, warm (after one run) and cold (fresh
    process with torch imported, as an RQ work horse forked from an idle worker is).

    The three are interleaved round by round, so that load from other processes on the machine
    hits them alike; medians and best-of are reported.
    """
    from recalib.client import RecalibClient
    from worker.pipeline import run_job

    files = make_job_files(work / "inputs", samples)
    run_job(_spec(files, work / "warm-up"))  # lazy imports and caches of this process
    times: dict[str, list[float]] = {"engine_warm": [], "engine_cold": [], "service": []}
    with ServiceStack(work / "stack", workers=1) as stack, RecalibClient(stack.url) as client:
        ids = {role: client.upload_file(path).id for role, path in files.items()}
        for i in range(repeats):
            start = time.perf_counter()
            run_job(_spec(files, work / f"warm-{i}"))
            times["engine_warm"].append(time.perf_counter() - start)
            times["engine_cold"].append(_cold_engine(files, work / f"cold-{i}"))
            start = time.perf_counter()
            job = client.create_job(ids["model"], ids["calibration"], ids["evaluation"])
            job = client.wait(job.id, poll_s=0.01)
            times["service"].append(time.perf_counter() - start)
            if job.status != "succeeded":
                raise RuntimeError(f"job {job.id} {job.status}: {job.error}")
    result: dict[str, Any] = {"samples": samples, "repeats": repeats}
    for name, values in times.items():
        result[f"{name}_s"] = values
        result[f"{name}_median_s"] = statistics.median(values)
        result[f"{name}_best_s"] = min(values)
    for peer in ("engine_warm", "engine_cold"):
        for stat in ("median", "best"):
            ratio = result[f"service_{stat}_s"] / result[f"{peer}_{stat}_s"]
            result[f"ratio_{stat}_vs_{peer}"] = ratio
    return result


# ---------------------------------------------------------------------------------------------
# (b) upload memory and throughput
# ---------------------------------------------------------------------------------------------


def _write_big_file(path: Path, size_bytes: int) -> None:
    block = os.urandom(16 * CHUNK)
    with path.open("wb") as fh:
        for start in range(0, size_bytes, len(block)):
            fh.write(block[: min(len(block), size_bytes - start)])


def _plain_copy(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    with src.open("rb") as fin, dst.open("wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
    return time.perf_counter() - start


def _upload(url: str, big: Path, size: int) -> float:
    def body() -> Any:
        with big.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    start = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/files",
        params={"filename": "big.bin"},
        content=body(),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    httpx.delete(f"{url}/v1/files/{response.json()['id']}").raise_for_status()
    return elapsed


def bench_upload(work: Path, size_mib: int, rounds: int) -> dict[str, Any]:
    """Alternate upload and plain copy ``rounds`` times (dirty pages synced before each)."""
    size = size_mib * CHUNK
    with ServiceStack(work / "stack", workers=0) as stack:
        big = stack.work_dir / "data" / "big.bin"  # same filesystem as the uploads
        _write_big_file(big, size)
        pid = stack.api.pid if stack.api else 0
        httpx.post(f"{stack.url}/v1/files", params={"filename": "warm.bin"}, content=b"w" * CHUNK)
        idle_rss, _ = rss_kib(pid)
        peak = [idle_rss]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_kib(pid)[0])
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        upload_s, copy_s = [], []
        for _ in range(rounds):
            os.sync()
            copy_s.append(_plain_copy(big, big.with_suffix(".copy")))
            big.with_suffix(".copy").unlink()
            os.sync()
            upload_s.append(_upload(stack.url, big, size))
        done.set()
        sampler.join()
        _, hwm = rss_kib(pid)
    upload, copy = statistics.median(upload_s), statistics.median(copy_s)
    return {
        "bytes": size,
        "rounds": rounds,
        "idle_rss_mib": idle_rss / 1024,
        "peak_rss_mib": peak[0] / 1024,
        "vm_hwm_mib": hwm / 1024,
        "rss_growth_mib": (max(peak[0], hwm) - idle_rss) / 1024,
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


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="job,upload,latency")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--upload-mib", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20, help="submit+status pairs per client")
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn --workers (latency)")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="recalib-bench-") as tmp:
        work = Path(tmp)
        parts = args.parts.split(",")
        if "job" in parts:
            results["job"] = bench_job(work / "job", args.samples, args.repeats)
        if "upload" in parts:
            results["upload"] = bench_upload(work / "upload", args.upload_mib, args.repeats)
        if "latency" in parts:
            results["latency"] = bench_latency(
                work / "latency", args.clients, args.rounds, args.api_workers
            )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
