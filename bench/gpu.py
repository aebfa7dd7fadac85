"""GPU benchmark: ResNet-50 recalibration against eval-mode inference, and one job via the service.

    python -m bench.gpu                        # on the device if any: 2,000 images at 224 px
    python -m bench.gpu --device cpu --images 64 --batch-size 16 --repeats 1   # the script on CPU

1. An image archive (JPEG in 10 class folders) of ``--images`` smooth synthetic 224×224 images,
   and ResNet-50 from torchvision (random init) as a safetensors state_dict with
   ``arch=torchvision.models:resnet50``.
2. In this process, through the pipeline's own data path (``open_samples`` + ``make_loader``,
   ``--data-workers`` loader processes, pinned memory on CUDA), the same batches for both:
   eval-mode inference throughput (``inference_mode``) and recalibration throughput
   (:func:`worker.engine.recalibrate`), images/s; and both again on batches already on the device
   (compute only). Target: recalibration ≥ 0.9× inference.
3. ``run_job`` in this process (warm: after one run) against one job through the service (one
   warm worker on the device, after a warm-up job): wall time, and the job's ``report.runtime``
   (was it data-bound).

Passes alternate (inference, recalibration) ``--repeats`` times after one warm-up each; medians.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import machine, write_results
from bench.stack import ServiceStack

ARCH = "torchvision.models:resnet50"


def make_archive(path: Path, images: int, size: int, seed: int = 0) -> Path:
    """``images`` JPEGs: low-frequency colour noise upsampled to ``size`` (natural-ish)."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(images):
            coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            archive.writestr(f"set/class{i % 10}/img{i:05d}.jpg", buffer.getvalue())
    return path


def make_model(path: Path) -> torch.nn.Module:
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(weights=None).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _infer(model: torch.nn.Module, batches: Any, device: torch.device) -> int:
    seen = 0
    with torch.inference_mode():
        for batch in batches:
            inputs = batch[0] if isinstance(batch, list | tuple) else batch
            model(inputs.to(device, non_blocking=True))
            seen += inputs.shape[0]
    _sync(device)
    return seen


def _recalibrate(model: torch.nn.Module, batches: Any, device: torch.device) -> int:
    from worker.engine import recalibrate

    result = recalibrate(model, batches, device=device)
    _sync(device)
    return result.samples


def engine_throughput(
    model: torch.nn.Module,
    archive: Path,
    device: torch.device,
    batch_size: int,
    data_workers: int,
    repeats: int,
) -> dict[str, Any]:
    """Images/s of inference and of recalibration, through the loader and on device tensors."""
    from worker.formats.data import make_loader, open_samples

    samples = open_samples(archive)
    loader = make_loader(
        samples,
        indices=None,
        batch_size=batch_size,
        pin_memory=device.type == "cuda",
        num_workers=data_workers,
    )
    on_device = [x.to(device) for x, _ in loader]  # decoded once: compute only
    model = model.to(device)
    contenders = {
        "infer_loader": lambda m: _infer(m, loader, device),
        "recal_loader": lambda m: _recalibrate(m, loader, device),
        "infer_device": lambda m: _infer(m, on_device, device),
        "recal_device": lambda m: _recalibrate(m, on_device, device),
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats + 1):  # round 0 warms up (cuDNN autotuning, lazy init)
        for name, run in contenders.items():
            fresh = copy.deepcopy(model)
            _sync(device)
            start = time.perf_counter()
            images = run(fresh)
            elapsed = time.perf_counter() - start
            if round_:
                rates[name].append(images / elapsed)
    samples.close()
    result: dict[str, Any] = {name: {"images_per_s": values} for name, values in rates.items()}
    for name, values in rates.items():
        result[name]["median"] = statistics.median(values)
    for path in ("loader", "device"):
        ratio = result[f"recal_{path}"]["median"] / result[f"infer_{path}"]["median"]
        result[f"recal_vs_infer_{path}"] = ratio
    return result


def job_walls(
    work: Path,
    model_path: Path,
    archive: Path,
    device: str,
    batch_size: int,
    data_workers: int,
    repeats: int,
) -> dict[str, Any]:
    """One job through the service vs run_job in this process, same files and options."""
    from recalib.client import RecalibClient
    from recalib.contract import JobOptions, JobSpec
    from worker.pipeline import run_job

    options = {"batch_size": batch_size, "eval_batch_size": batch_size, "device": device}
    spec = JobSpec(
        model_path=str(model_path),
        calibration_path=str(archive),
        arch=ARCH,
        options=JobOptions.model_validate(options),
        out_dir=str(work / "engine-warm-up"),
    )
    run_job(spec, data_workers=data_workers)  # warm-up
    engine, service, runtimes = [], [], []
    env = {"RECALIB_WORKER_DEVICE": device, "RECALIB_DATA_WORKERS": str(data_workers)}
    with (
        ServiceStack(work / "stack", workers=1, **env) as stack,
        RecalibClient(stack.url) as client,
    ):
        model_id = client.upload_file(model_path, direct=False).id  # through the API
        archive_id = client.upload_file(archive, direct=False).id

        def one_job() -> tuple[float, Any]:
            start = time.perf_counter()
            job = client.create_job(model_id, archive_id, arch=ARCH, options=options)
            job = client.wait(job.id, poll_s=0.02)
            if job.status != "succeeded":
                raise RuntimeError(f"job {job.id} {job.status}: {job.error}")
            return time.perf_counter() - start, job.result

        one_job()  # warm-up: the runner's first run of this model
        for i in range(repeats):
            start = time.perf_counter()
            run_job(spec.model_copy(update={"out_dir": str(work / f"engine-{i}")}),
                    data_workers=data_workers)  # fmt: skip
            engine.append(time.perf_counter() - start)
            wall, report = one_job()
            service.append(wall)
            runtimes.append(report.runtime.model_dump() if report.runtime else None)
    return {
        "engine_s": engine,
        "service_s": service,
        "engine_median_s": statistics.median(engine),
        "service_median_s": statistics.median(service),
        "service_vs_engine": statistics.median(service) / statistics.median(engine),
        "service_runtime": runtimes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="engine,job")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"out": str(args.out)}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="recalib-bench-gpu-") as tmp:
        work = Path(tmp)
        archive = make_archive(work / "images.zip", args.images, args.size)
        model = make_model(work / "resnet50.safetensors")
        results["archive_bytes"] = archive.stat().st_size
        parts = args.parts.split(",")
        if "engine" in parts:
            results["engine"] = engine_throughput(
                model, archive, device, args.batch_size, args.data_workers, args.repeats
            )
        if "job" in parts:
            results["job"] = job_walls(
                work, work / "resnet50.safetensors", archive, args.device, args.batch_size,
                args.data_workers, args.repeats,
            )  # fmt: skip
    write_results(results, args.out)


if __name__ == "__main__":
    main()
