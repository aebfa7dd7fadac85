"""worker.runtime through the pipeline: out-of-memory halving, data-loading processes, the report.

No GPU here: the OOM model (tests/worker/oom_models.py) raises ``torch.OutOfMemoryError``, the
exception type torch raises on a CUDA out-of-memory, past a batch size. The reference for the
halved run is a run at the smaller batch size from the start.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from recalib.contract import JobOptions, JobSpec, OomRetry, Preprocess
from recalib.errors import InvalidModelError
from tests.worker import oom_models
from tests.worker.formats_files import digit_pngs
from worker.formats.models import read_model
from worker.pipeline import run_job
from worker.runtime import RunClock, halve_on_oom, is_out_of_memory


def _stats(path: Path, arch: str, allowlist: tuple[str, ...], **kwargs: object) -> dict:
    module = read_model(path, arch=arch, arch_allowlist=allowlist, arch_kwargs=kwargs).module
    return {k: v for k, v in module.state_dict().items() if "running" in k}


@pytest.fixture
def oom_model(digits_case, tmp_path: Path) -> Path:
    path = tmp_path / "digits.safetensors"
    state = {k: v.detach().contiguous() for k, v in digits_case.model.state_dict().items()}
    save_file(state, str(path))
    return path


def _oom_spec(model: Path, files: dict, out: Path, max_batch: int, **options: object) -> JobSpec:
    return JobSpec(
        model_path=str(model),
        calibration_path=str(files["calibration"]),
        eval_path=str(files["evaluation"]),
        arch=oom_models.ARCH,
        arch_kwargs={"max_batch": max_batch},
        arch_allowlist=list(oom_models.ALLOWLIST),
        out_dir=str(out),
        options=JobOptions.model_validate(options),
    )


@pytest.mark.slow
def test_out_of_memory_passes_run_again_at_half_the_batch_and_equal_a_run_at_that_size(
    oom_model: Path, digits_files, tmp_path: Path
) -> None:
    halved = run_job(
        _oom_spec(oom_model, digits_files, tmp_path / "a", 4, batch_size=8, eval_batch_size=16)
    )
    reference = run_job(
        _oom_spec(oom_model, digits_files, tmp_path / "b", 10_000, batch_size=4, eval_batch_size=4)
    )
    assert halved.runtime is not None and reference.runtime is not None
    assert halved.runtime.oom_retries == [
        OomRetry(step="evaluate_before", batch_size=16, retried_with=8),
        OomRetry(step="evaluate_before", batch_size=8, retried_with=4),
        OomRetry(step="recalibrate", batch_size=8, retried_with=4),
    ]  # evaluate_after starts at the size that fitted
    assert reference.runtime.oom_retries == []
    kwargs = {"max_batch": 10_000}
    got = _stats(tmp_path / "a" / halved.checkpoint.file, oom_models.ARCH, oom_models.ALLOWLIST,
                 **kwargs)  # fmt: skip
    expected = _stats(tmp_path / "b" / reference.checkpoint.file, oom_models.ARCH,
                      oom_models.ALLOWLIST, **kwargs)  # fmt: skip
    assert got.keys() == expected.keys() and got
    for name in got:
        assert torch.equal(got[name], expected[name]), name
    assert halved.calibration.samples == reference.calibration.samples
    assert halved.before == reference.before and halved.after == reference.after


def test_halving_stops_at_two_samples_with_a_clear_error() -> None:
    clock = RunClock()
    tried: list[int] = []

    def never_fits(batch_size: int) -> None:
        tried.append(batch_size)
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as exc:
            raise RuntimeError("the model failed") from exc  # wrapped, as user code may

    with pytest.raises(InvalidModelError, match="recalibrate at 2 samples per batch"):
        halve_on_oom(never_fits, 9, step="recalibrate", clock=clock)
    assert tried == [9, 4, 2]
    assert [(r.batch_size, r.retried_with) for r in clock.oom_retries] == [(9, 4), (4, 2)]
    with pytest.raises(InvalidModelError, match="8 is the floor"):
        halve_on_oom(never_fits, 8, step="evaluate_before", clock=RunClock(), min_size=8)
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))


def _digit_archive(path: Path, inputs, labels, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i, (png, label) in enumerate(
            zip(digit_pngs(inputs, count), labels[:count], strict=True)
        ):
            archive.writestr(f"set/{label}/img{i:04d}.png", png)
    return path


@pytest.mark.slow
def test_image_archives_decoded_by_loader_processes_give_the_same_result(
    digits_case, digits_files, tmp_path: Path
) -> None:
    inputs, labels = digits_case.shifted_calibration
    archive = _digit_archive(tmp_path / "target.zip", inputs, labels, 300)
    reports = {}
    for workers in (0, 2):
        reports[workers] = run_job(
            JobSpec(
                model_path=str(digits_files["model"]),
                calibration_path=str(archive),
                out_dir=str(tmp_path / f"w{workers}"),
                options=JobOptions(batch_size=16, preprocess=Preprocess(mode="L")),
            ),
            data_workers=workers,
        )
    serial, parallel = reports[0], reports[2]
    assert serial.runtime is not None and parallel.runtime is not None
    assert (serial.runtime.data_workers, parallel.runtime.data_workers) == (0, 2)
    assert serial.layers == parallel.layers and serial.after == parallel.after
    assert serial.calibration == parallel.calibration
    for runtime in (serial.runtime, parallel.runtime):
        assert runtime.data_wait_s > 0 and runtime.compute_s > 0
        assert runtime.data_bound == (runtime.data_wait_s > runtime.compute_s)
        assert not runtime.pinned_memory  # CPU


def test_tensor_files_are_sliced_in_the_job_process(digits_files, tmp_path: Path) -> None:
    report = run_job(
        JobSpec(
            model_path=str(digits_files["model"]),
            calibration_path=str(digits_files["calibration"]),
            eval_path=str(digits_files["evaluation"]),
            out_dir=str(tmp_path / "out"),
        ),
        data_workers=4,
    )
    assert report.runtime is not None and report.runtime.data_workers == 0
