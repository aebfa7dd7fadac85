"""``--fold`` on a ``.pt2`` through worker.pipeline.run_job: the folded program keeps the input
program's dynamic dimensions, their bounds and relations; a program with a fixed batch stays
fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.export import Dim

from recalib.contract import JobOptions, JobSpec
from worker.digits import DigitsNet
from worker.fold_export import save_folded
from worker.folding import fold_batchnorm
from worker.formats.export_program import program_input
from worker.formats.models import read_model
from worker.pipeline import run_job


def _dynamic(case: str) -> dict[int, Any]:
    batch = Dim("batch", min=1, max=64) if case == "bounded_batch" else Dim("batch", min=1)
    if case == "batch_and_side":
        side = Dim("side", min=8, max=32)
        return {0: batch, 2: side, 3: side}
    return {0: batch}


def _job(tmp_path: Path, dynamic_shapes: dict[int, Any] | None, batch: int = 4) -> Any:
    torch.manual_seed(0)
    model = DigitsNet().eval()
    model_path = tmp_path / "model.pt2"
    example = (torch.randn(batch, 1, 8, 8),)
    dims = None if dynamic_shapes is None else (dynamic_shapes,)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=dims), model_path)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "calibration.npz", inputs=rng.normal(1.0, 2.0, (48, 1, 8, 8)).astype("float32")
    )
    np.savez(
        tmp_path / "eval.npz",
        inputs=rng.normal(1.0, 2.0, (24, 1, 8, 8)).astype("float32"),
        labels=rng.integers(0, 10, 24),
    )
    spec = JobSpec(
        model_path=str(model_path),
        calibration_path=str(tmp_path / "calibration.npz"),
        eval_path=str(tmp_path / "eval.npz"),
        out_dir=str(tmp_path / "out"),
        options=JobOptions(fold=True),
    )
    report = run_job(spec)
    assert report.folded is not None and report.folded.folded == 3
    out = tmp_path / "out"
    folded = torch.export.load(out / report.folded.artifact.file)
    recalibrated = torch.export.load(out / report.checkpoint.file)
    return folded, recalibrated


def _assert_same(folded: Any, recalibrated: Any, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = recalibrated.module()(x)
        torch.testing.assert_close(folded.module()(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["batch", "bounded_batch", "batch_and_side"])
def test_folded_program_keeps_the_dynamic_dimensions_of_the_input_program(case, tmp_path) -> None:
    folded, recalibrated = _job(tmp_path, _dynamic(case))
    torch.manual_seed(1)
    for shape in [(3, 1, 8, 8), (5, 1, 8, 8)] + (
        [(3, 1, 16, 16)] if case == "batch_and_side" else []
    ):
        _assert_same(folded, recalibrated, torch.randn(*shape))
    spec, original = program_input(folded), program_input(recalibrated)
    assert spec is not None and original is not None
    assert (spec.shape, spec.batch_max) == (original.shape, original.batch_max)


def test_folded_program_of_a_fixed_batch_program_stays_fixed(tmp_path) -> None:
    folded, recalibrated = _job(tmp_path, None, batch=4)
    _assert_same(folded, recalibrated, torch.randn(4, 1, 8, 8))
    spec = program_input(folded)
    assert spec is not None and spec.shape == (4, 1, 8, 8)


class _TwoInputs(torch.nn.Module):
    """Conv-BN on ``x``; ``y`` has twice its batch (a derived dimension, ``2*batch``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean((1, 2, 3)).repeat(2) + y.sum(1)


def test_folded_program_keeps_a_derived_dimension(tmp_path) -> None:
    batch = Dim("batch", min=1, max=32)
    example = (torch.randn(3, 1, 8, 8), torch.randn(6, 5))
    program = torch.export.export(
        _TwoInputs().eval(), example, dynamic_shapes=({0: batch}, {0: 2 * batch})
    )
    torch.export.save(program, tmp_path / "two.pt2")
    loaded = read_model(tmp_path / "two.pt2")
    result = fold_batchnorm(loaded)
    assert result.folded == 1
    artifact = save_folded(result, loaded, (example[0][:2], example[1][:4]), tmp_path / "out")
    folded = torch.export.load(tmp_path / "out" / artifact.file)
    x, y = torch.randn(5, 1, 8, 8), torch.randn(10, 5)
    with torch.no_grad():
        torch.testing.assert_close(folded.module()(x, y), program.module()(x, y), atol=1e-5, rtol=0)
