"""Job benchmarks through the service: warm workers against forking workers, in the same run.

(a) ``job``: wall time create→succeeded of one ``samples``-sample digits job through the service
    (HTTP + Redis + worker) with warm workers and with forking workers, against
    ``worker.pipeline.run_job`` in this process (warm: after one run) and in a fresh process
    (cold), interleaved round by round; plus each service job's ``load`` phase (the first job of
    a stack against the repeats: the warm runner's model cache).
(small) ``small``: ``jobs`` small jobs (the same model, each its own target set) submitted at
    once to a stack of ``workers`` workers; jobs per minute from the first submit to the last
    success, warm workers against forking workers, stacks alternating round by round.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import summary
from bench.stack import REPO_ROOT, ServiceStack

MODES = ("warm", "fork")


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


def make_target_sets(out_dir: Path, count: int, samples: int) -> list[Path]:
    """``count`` labeled target sets of ``samples`` digits, each shifted its own way."""
    import numpy as np

    from worker.digits import load_digits_arrays, shift_domain

    inputs, labels = load_digits_arrays()
    paths = []
    for i in range(count):
        idx = np.random.default_rng(i).permutation(len(inputs))[:samples]
        path = out_dir / f"site-{i:02d}.npz"
        np.savez(path, inputs=shift_domain(inputs[idx], seed=100 + i), labels=labels[idx])
        paths.append(path)
    return paths


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


def service_job(client: Any, ids: dict[str, str]) -> tuple[float, float]:
    """(wall s create→succeeded, the job's load phase s)."""
    start = time.perf_counter()
    job = client.create_job(ids["model"], ids["calibration"], ids.get("evaluation"))
    job = client.wait(job.id, poll_s=0.01)
    wall = time.perf_counter() - start
    if job.status != "succeeded":
        raise RuntimeError(f"job {job.id} {job.status}: {job.error}")
    return wall, float(job.result.timings_s["load"])


def bench_job(work: Path, samples: int, repeats: int) -> dict[str, Any]:
    """Service (warm and fork workers) create→succeeded vs run_job in-process warm and cold."""
    from recalib.client import RecalibClient
    from worker.pipeline import run_job

    files = make_job_files(work / "inputs", samples)
    run_job(_spec(files, work / "warm-up"))  # lazy imports and caches of this process
    times: dict[str, list[float]] = {"engine_warm": [], "engine_cold": []}
    loads: dict[str, list[float]] = {}
    first: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        clients, ids = {}, {}
        for mode in MODES:
            service = stack.enter_context(
                ServiceStack(work / f"stack-{mode}", workers=1, RECALIB_WORKER_MODE=mode)
            )
            clients[mode] = stack.enter_context(RecalibClient(service.url))
            ids[mode] = {role: clients[mode].upload_file(p).id for role, p in files.items()}
            times[f"service_{mode}"], loads[mode] = [], []
        for mode in MODES:  # each stack's first job: its worker's first run of this model
            wall, load_s = service_job(clients[mode], ids[mode])
            first[mode] = {"wall_s": wall, "load_s": load_s}
        for i in range(repeats):
            start = time.perf_counter()
            run_job(_spec(files, work / f"warm-{i}"))
            times["engine_warm"].append(time.perf_counter() - start)
            times["engine_cold"].append(_cold_engine(files, work / f"cold-{i}"))
            for mode in MODES:
                wall, load_s = service_job(clients[mode], ids[mode])
                times[f"service_{mode}"].append(wall)
                loads[mode].append(load_s)
    result: dict[str, Any] = {"samples": samples, "repeats": repeats, "first_job": first}
    result |= {f"{name}_s": summary(values) for name, values in times.items()}
    for mode in MODES:
        service = result[f"service_{mode}_s"]
        for peer in ("engine_warm", "engine_cold"):
            for stat in ("median", "best"):
                ratio = service[stat] / result[f"{peer}_s"][stat]
                result[f"ratio_{stat}_{mode}_vs_{peer}"] = ratio
        repeat_load = statistics.median(loads[mode])
        result[f"load_{mode}"] = {
            "first_s": first[mode]["load_s"],
            "repeats_s": loads[mode],
            "repeat_median_s": repeat_load,
            "repeat_vs_first": repeat_load / first[mode]["load_s"],
        }
    return result


def _throughput(work: Path, mode: str, model: Path, targets: list[Path], workers: int) -> float:
    """Seconds from submitting one job per target set (all at once) to the last success."""
    from recalib.client import RecalibClient

    with (
        ServiceStack(work, workers=workers, RECALIB_WORKER_MODE=mode) as service,
        RecalibClient(service.url) as client,
    ):
        model_id = client.upload_file(model).id
        target_ids = [client.upload_file(path).id for path in targets]
        warm_up = [client.create_job(model_id, target_ids[0]) for _ in range(workers)]
        for job in warm_up:  # every worker has started (and run a job) before the clock
            client.wait(job.id, poll_s=0.05)
        start = time.perf_counter()
        jobs = [client.create_job(model_id, target_id) for target_id in target_ids]
        for job in jobs:
            done = client.wait(job.id, poll_s=0.05)
            if done.status != "succeeded":
                raise RuntimeError(f"job {done.id} {done.status}: {done.error}")
        return time.perf_counter() - start


def bench_small_jobs(
    work: Path, jobs: int, samples: int, workers: int, rounds: int
) -> dict[str, Any]:
    """Jobs per minute of ``jobs`` small jobs on ``workers`` workers, warm vs fork."""
    files = make_job_files(work / "inputs", samples)
    targets = make_target_sets(work / "inputs", jobs, samples)
    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            wall = _throughput(work / f"{mode}-{r}", mode, files["model"], targets, workers)
            walls[mode].append(wall)
    result: dict[str, Any] = {"jobs": jobs, "samples": samples, "workers": workers}
    for mode in MODES:
        per_min = [jobs * 60.0 / wall for wall in walls[mode]]
        result[mode] = {"wall_s": walls[mode], "jobs_per_min": per_min}
        result[mode]["jobs_per_min_median"] = statistics.median(per_min)
    result["warm_vs_fork"] = (
        result["warm"]["jobs_per_min_median"] / (result["fork"]["jobs_per_min_median"])
    )
    return result
