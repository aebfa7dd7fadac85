"""Object storage benchmarks (issue 11), recorded in docs/benchmarks/storage.md.

(a) ``--parts upload``: one file (1 GiB by default) into a real S3 server (SeaweedFS ``weed
    mini``, started here) three ways, interleaved round by round in one run: streamed through
    the API (``POST /v1/files`` → multipart upload into S3; the API's RSS sampled every 10 ms),
    directly with presigned multipart URLs (``recalib.client_upload.direct_upload``: parts in
    parallel, then the server's completion, which reads the object back to verify its sha256),
    and boto3's own ``upload_file`` (its default managed transfer) as the yardstick.
(b) ``--parts job``: the 2,000-sample digits job (as bench/service.py's), create → succeeded,
    on a service with local storage and one with S3 storage (the worker's data directory apart
    from the API's), interleaved.

    python -m bench.storage --parts upload,job --size-mib 1024 --rounds 3 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import CHUNK, PeakRss, summary, upload_through_api, write_random_file
from bench.jobs import make_job_files, service_job
from bench.stack import ServiceStack


def _direct(url: str, path: Path, sha256: str) -> float:
    from recalib.client import raise_for_problem
    from recalib.client_upload import direct_upload

    with httpx.Client(base_url=url, timeout=1200) as http:
        start = time.perf_counter()
        file = direct_upload(http, path, sha256, raise_for_problem)
        elapsed = time.perf_counter() - start
        if file is None:
            raise RuntimeError("the server does not offer direct uploads")
        http.delete(f"/v1/files/{file.id}").raise_for_status()
    return elapsed


def _boto3(client: Any, bucket: str, key: str, path: Path) -> float:
    start = time.perf_counter()
    client.upload_file(str(path), bucket, key)
    elapsed = time.perf_counter() - start
    client.delete_object(Bucket=bucket, Key=key)
    return elapsed


def bench_upload(work: Path, weed: Any, size_mib: int, rounds: int) -> dict[str, Any]:
    from recalib.files.storage.s3 import make_client

    size = size_mib * CHUNK
    work.mkdir(parents=True, exist_ok=True)
    big = work / "big.bin"
    sha256 = write_random_file(big, size)
    env = _s3_env(weed, "bench-upload") | {"RECALIB_MAX_UPLOAD_BYTES": str(2 * size)}
    s3 = make_client(weed.endpoint)
    times: dict[str, list[float]] = {"api": [], "direct": [], "boto3": []}
    with ServiceStack(work / "stack", workers=0, **env) as stack:
        pid = stack.api.pid if stack.api else 0
        httpx.post(f"{stack.url}/v1/files", params={"filename": "w.bin"}, content=b"w" * CHUNK)
        with PeakRss(pid) as rss:
            for i in range(rounds):
                os.sync()
                times["api"].append(upload_through_api(stack.url, big, size, timeout_s=1200))
                api_peak = rss.peak_kib
                times["direct"].append(_direct(stack.url, big, sha256))
                times["boto3"].append(_boto3(s3, weed.bucket, f"bench-boto3/{i}", big))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "bytes": size,
        "rounds": rounds,
        "api_idle_rss_mib": rss.idle_kib / 1024,
        "api_peak_rss_mib_during_api_uploads": api_peak / 1024,
        "api_vm_hwm_mib": rss.hwm_kib / 1024,
        "api_rss_growth_mib": (max(api_peak, rss.hwm_kib) - rss.idle_kib) / 1024,
        **{f"{name}_s": summary(values, digits=3) for name, values in times.items()},
        **{f"{name}_mib_s": size_mib / median for name, median in medians.items()},
        "direct_vs_boto3": medians["direct"] / medians["boto3"],
        "api_vs_boto3": medians["api"] / medians["boto3"],
    }


def _s3_env(weed: Any, prefix: str) -> dict[str, str]:
    return weed.env | {
        "RECALIB_STORAGE_URL": f"s3://{weed.bucket}/{prefix}",
        "RECALIB_S3_ENDPOINT_URL": weed.endpoint,
    }


def bench_job(work: Path, weed: Any, samples: int, repeats: int) -> dict[str, Any]:
    from recalib.client import RecalibClient

    files = make_job_files(work / "inputs", samples)
    stacks = {
        "local": {},
        "s3": _s3_env(weed, "bench-job") | {"RECALIB_DATA_DIR": str(work / "worker-data")},
    }
    times: dict[str, list[float]] = {name: [] for name in stacks}
    with contextlib.ExitStack() as exits:
        clients, ids = {}, {}
        for name, env in stacks.items():
            api_env = {k: v for k, v in env.items() if k != "RECALIB_DATA_DIR"}
            stack = ServiceStack(work / f"stack-{name}", workers=0, **api_env)
            service = exits.enter_context(stack)
            if env:  # the worker gets a data directory of its own: nothing shared with the API
                service.env = service.env | env
            service.start_worker()
            service._wait_ready()
            clients[name] = exits.enter_context(RecalibClient(service.url))
            ids[name] = {role: clients[name].upload_file(p).id for role, p in files.items()}
            service_job(clients[name], ids[name])  # each worker's first run: not counted
        for _ in range(repeats):
            for name in stacks:
                times[name].append(service_job(clients[name], ids[name])[0])
    result: dict[str, Any] = {"samples": samples, "repeats": repeats}
    result |= {f"{name}_s": summary(values, digits=3) for name, values in times.items()}
    for stat in ("median", "best"):
        result[f"s3_vs_local_{stat}"] = result["s3_s"][stat] / result["local_s"][stat]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="upload,job")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    from tests.s3_fixtures import start_weed

    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_at_start": os.getloadavg()},
    }  # fmt: skip
    weed = start_weed()
    os.environ.update(weed.env)
    try:
        with tempfile.TemporaryDirectory(prefix="recalib-bench-storage-") as tmp:
            work = Path(tmp)
            if "upload" in args.parts:
                results["upload"] = bench_upload(work / "u", weed, args.size_mib, args.rounds)
                print(json.dumps(results["upload"], indent=2))
            if "job" in args.parts:
                results["job"] = bench_job(work / "j", weed, args.samples, args.repeats)
                print(json.dumps(results["job"], indent=2))
    finally:
        weed.stop()
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
