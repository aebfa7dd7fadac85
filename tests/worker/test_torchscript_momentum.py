"""BN layers with ``momentum=0.0`` (converted models ship so) through worker.pipeline.run_job.

Eager BN and ``.pt2`` programs recalibrate as any other (the engine runs their BN at momentum 1).
In a scripted module momentum is a constant, and at 0 its buffers never show a batch's
statistics: the job is refused, naming the layers and the fix, before anything changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from recalib.contract import JobOptions, JobSpec
from recalib.errors import InvalidModelError
from tests.bn_oracle import assert_statistics_equal, calibration_order, pooled_bn_statistics
from worker.digits import DigitsNet
from worker.engine import recalibrate
from worker.pipeline import run_job

BN_NAMES = ("features.1", "features.4", "head.1")


def _zero_momentum_net() -> DigitsNet:
    torch.manual_seed(0)
    model = DigitsNet().eval()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.momentum = 0.0
    return model


def _data(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    calibration, evaluation = tmp_path / "calibration.npz", tmp_path / "eval.npz"
    np.savez(calibration, inputs=rng.normal(1.0, 2.0, (80, 1, 8, 8)).astype("float32"))
    np.savez(
        evaluation,
        inputs=rng.normal(1.0, 2.0, (24, 1, 8, 8)).astype("float32"),
        labels=rng.integers(0, 10, 24),
    )
    return calibration, evaluation


def _spec(model_path: Path, tmp_path: Path, *, allow_unsafe_pickle: bool = False) -> JobSpec:
    calibration, evaluation = _data(tmp_path)
    return JobSpec(
        model_path=str(model_path),
        calibration_path=str(calibration),
        eval_path=str(evaluation),
        out_dir=str(tmp_path / "out"),
        options=JobOptions(),
        allow_unsafe_pickle=allow_unsafe_pickle,
    )


def test_scripted_bn_with_zero_momentum_is_refused_naming_the_layers(tmp_path) -> None:
    model = _zero_momentum_net()
    assert [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)] == list(BN_NAMES)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    with pytest.raises(InvalidModelError) as caught:
        run_job(_spec(path, tmp_path))
    message = str(caught.value)
    assert "momentum" in message and "NaN" not in message
    for name in BN_NAMES:
        assert repr(name) in message
    assert "torch.export" in message  # a way out: set momentum before scripting, or export
    assert not (tmp_path / "out" / "report.json").exists()

    # The engine alone refuses it too, before it resets any buffer.
    scripted = torch.jit.load(str(path))
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    with pytest.raises(InvalidModelError, match=r"momentum=0\.0"):
        recalibrate(scripted, [torch.randn(8, 1, 8, 8) for _ in range(2)])
    after = scripted.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())


@pytest.mark.parametrize("kind", ["pt2", "eager"])
def test_zero_momentum_bn_recalibrates_to_the_pooled_statistics(kind, tmp_path) -> None:
    model = _zero_momentum_net()
    if kind == "pt2":
        path = tmp_path / "model.pt2"
        batch = torch.export.Dim("batch", min=1)
        example = (torch.randn(4, 1, 8, 8),)
        torch.export.save(torch.export.export(model, example, dynamic_shapes=({0: batch},)), path)
        spec = _spec(path, tmp_path)
    else:
        path = tmp_path / "whole.pt"
        torch.save(model, path)
        spec = _spec(path, tmp_path, allow_unsafe_pickle=True)
    report = run_job(spec)

    assert [layer.name for layer in report.layers] == list(BN_NAMES)
    order = calibration_order(Path(spec.calibration_path), Path(str(spec.eval_path)))
    inputs = torch.from_numpy(np.load(spec.calibration_path)["inputs"])
    expected = pooled_bn_statistics(model, inputs, order, spec.options.batch_size)
    out = tmp_path / "out" / report.checkpoint.file
    if kind == "pt2":
        saved = DigitsNet()
        saved.load_state_dict(torch.export.load(out).state_dict)
    else:
        saved = torch.load(out, weights_only=False)
        momenta = {m.momentum for m in saved.modules() if isinstance(m, _BatchNorm)}
        assert momenta == {0.0}  # the engine's momentum 1 is not left behind
    assert_statistics_equal(saved, expected)
