"""Sandbox benchmarks: what confining every job costs, through the real service.

Run from the repository root:

    python -m bench.sandbox --threads 1            # both parts, 7 rounds
    python -m bench.sandbox --threads 1 --parts overhead --repeats 11 --out results.json

(overhead) wall time create→succeeded of one ``samples``-sample digits job (the 2,000-sample job
    of ``bench.service``) through a stack whose worker runs jobs sandboxed (``RECALIB_SANDBOX=
    strict``) against one whose worker does not (``off``), and against ``worker.pipeline.run_job``
    in this warm process (the warm engine), interleaved round by round. Repeat jobs of one tenant
    (the same model each round) are what is compared: each stack's first job is left out.
(tenants) ``jobs`` small jobs (300 samples) on one sandboxed worker, all of one tenant against
    alternating between two tenants; the difference of the medians is what a tenant switch costs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, summary, write_results
from bench.jobs import _spec, make_job_files, service_job
from bench.stack import ServiceStack

KEYS = {"alice": "bench-alice-key", "bob": "bench-bob-key"}


def bench_overhead(work: Path, samples: int, repeats: int) -> dict[str, Any]:
    from recalib.client import RecalibClient
    from worker.pipeline import run_job

    files = make_job_files(work / "inputs", samples)
    run_job(_spec(files, work / "warm-up"))
    times: dict[str, list[float]] = {"engine_warm": [], "strict": [], "off": []}
    with contextlib.ExitStack() as stack:
        clients, ids = {}, {}
        for level in ("strict", "off"):
            service = stack.enter_context(ServiceStack(work / f"stack-{level}", workers=1,
                                                       RECALIB_SANDBOX=level))  # fmt: skip
            clients[level] = stack.enter_context(RecalibClient(service.url))
            ids[level] = {role: clients[level].upload_file(p).id for role, p in files.items()}
            service_job(clients[level], ids[level])  # the first job of the stack: not counted
        for i in range(repeats):
            start = time.perf_counter()
            run_job(_spec(files, work / f"engine-{i}"))
            times["engine_warm"].append(time.perf_counter() - start)
            for level in ("strict", "off"):
                times[level].append(service_job(clients[level], ids[level])[0])
    result: dict[str, Any] = {"samples": samples, "repeats": repeats}
    result |= {f"{name}_s": summary(values, 4) for name, values in times.items()}
    for stat in ("median", "best"):
        pick = statistics.median if stat == "median" else min
        result[f"ratio_{stat}_strict_vs_off"] = pick(times["strict"]) / pick(times["off"])
        result[f"ratio_{stat}_strict_vs_engine_warm"] = pick(times["strict"]) / pick(
            times["engine_warm"]
        )
    return result


def bench_tenants(work: Path, jobs: int) -> dict[str, Any]:
    from recalib.client import RecalibClient

    files = make_job_files(work / "inputs", 300)
    keys = ",".join(f"{tenant}:{key}" for tenant, key in KEYS.items())
    times: dict[str, list[float]] = {"one_tenant": [], "alternating": []}
    with ServiceStack(work / "stack", workers=1, RECALIB_API_KEYS=keys) as service:
        clients = {t: RecalibClient(service.url, api_key=k) for t, k in KEYS.items()}
        ids = {t: {r: c.upload_file(p).id for r, p in files.items()} for t, c in clients.items()}
        for tenant in KEYS:
            service_job(clients[tenant], ids[tenant])  # first jobs: not counted
        for _ in range(jobs):
            times["one_tenant"].append(service_job(clients["alice"], ids["alice"])[0])
        for i in range(jobs):
            tenant = ("alice", "bob")[i % 2]
            times["alternating"].append(service_job(clients[tenant], ids[tenant])[0])
        for client in clients.values():
            client.close()
    result: dict[str, Any] = {"jobs": jobs, "samples": 300}
    result |= {f"{name}_s": summary(values, 4) for name, values in times.items()}
    result["switch_cost_s"] = statistics.median(times["alternating"]) - statistics.median(
        times["one_tenant"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="overhead,tenants")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of every contender (OMP_NUM_THREADS: this process, the API, the "
        "workers and their jobs); 0 leaves torch's default",
    )
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before anything imports torch
    results: dict[str, Any] = {"machine": machine(), "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="recalib-bench-sandbox-") as tmp:
        work = Path(tmp)
        if "overhead" in args.parts:
            results["overhead"] = bench_overhead(work / "overhead", args.samples, args.repeats)
        if "tenants" in args.parts:
            results["tenants"] = bench_tenants(work / "tenants", args.jobs)
    write_results(results, args.out)


if __name__ == "__main__":
    main()
