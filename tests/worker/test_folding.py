"""worker.folding: folded models equal unfolded ones on digits; what cannot fold says why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.worker.formats_files import bn_stats, export_program, write_model_files
from worker.fold_export import save_folded
from worker.folding import fold_batchnorm
from worker.formats.models import LoadedModel, read_model

ARCH = {"arch": "worker.digits:DigitsNet", "arch_allowlist": ("worker.digits",)}
KWARGS = {
    "pt2": {},
    "scripted": {},
    "traced": {},
    "safetensors": ARCH,
    "module": {"allow_unsafe_pickle": True},
}


@pytest.fixture(scope="module")
def shifted(digits_case) -> torch.Tensor:
    return torch.from_numpy(digits_case.shifted_evaluation[0])


@pytest.fixture(scope="module")
def model_files(digits_case, shifted, tmp_path_factory):
    return write_model_files(digits_case.model, shifted[:4], tmp_path_factory.mktemp("fold"))


class Mixed(nn.Module):
    """BN in every position: after conv (folds), after ReLU, after a shared conv output, after
    pooling (none fold), after linear (folds)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu, self.bn2 = nn.ReLU(), nn.BatchNorm2d(8)
        self.conv2, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool, self.bn4 = nn.MaxPool2d(2), nn.BatchNorm2d(8)
        self.fc, self.bn5 = nn.Linear(8 * 4 * 4, 10), nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.relu(self.bn1(self.conv1(x))))
        y = self.conv2(x)
        x = self.bn4(self.pool(self.bn3(y) + y))
        return self.bn5(self.fc(x.flatten(1)))


@pytest.fixture(scope="module")
def mixed(shifted) -> Mixed:
    torch.manual_seed(0)
    model = Mixed()
    torch.optim.swa_utils.update_bn([shifted[i : i + 64] for i in range(0, 256, 64)], model)
    return model.eval()


@pytest.mark.parametrize("kind", list(KWARGS))
def test_digits_folds_every_bn_and_keeps_outputs(kind, model_files, shifted, tmp_path):
    loaded = read_model(model_files[kind], **KWARGS[kind])
    before = bn_stats(loaded.module)
    result = fold_batchnorm(loaded)
    assert (result.folded, result.not_folded) == (3, [])
    with torch.no_grad():
        reference, folded = loaded.module(shifted), result.module(shifted)
    torch.testing.assert_close(folded, reference, atol=1e-4, rtol=0)
    assert torch.equal(loaded.module(shifted), reference)  # the loaded model is untouched
    assert bn_stats(loaded.module).keys() == before.keys()
    if not isinstance(result.module, torch.jit.ScriptModule):
        assert not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.module.modules()
        )
    artifact = save_folded(result, loaded, shifted[:1], tmp_path)
    path = tmp_path / artifact.file
    if kind in ("scripted", "traced"):
        assert artifact.format == "torchscript"
        reloaded = torch.jit.load(str(path))
    else:
        assert artifact.format == "pt2" and artifact.file.endswith(".folded.pt2")
        reloaded = torch.export.load(path).module()
    with torch.no_grad():
        for batch in (1, 3, len(shifted)):  # dynamic batch
            torch.testing.assert_close(
                reloaded(shifted[:batch]), reference[:batch], atol=1e-4, rtol=0
            )


def _reasons(result) -> dict[str, str]:
    return {layer.name: layer.reason for layer in result.not_folded}


def test_mixed_model_folds_only_conv_and_linear_outputs(mixed, shifted, tmp_path):
    loaded = LoadedModel(mixed, "module", tmp_path / "mixed.pt")
    result = fold_batchnorm(loaded)
    assert result.folded == 2
    reasons = _reasons(result)
    assert set(reasons) == {"bn2", "bn3", "bn4"}
    assert reasons["bn2"] == "follows relu (ReLU), not a conv/linear"
    assert reasons["bn3"] == "the conv2 (Conv2d) output also feeds 1 other node(s)"
    assert reasons["bn4"] == "follows pool (MaxPool2d), not a conv/linear"
    assert all(layer.type == "BatchNorm2d" for layer in result.not_folded)
    with torch.no_grad():
        torch.testing.assert_close(result.module(shifted), mixed(shifted), atol=1e-4, rtol=0)
    artifact = save_folded(result, loaded, shifted[:2], tmp_path)
    program = torch.export.load(tmp_path / artifact.file)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(shifted), mixed(shifted), atol=1e-4, rtol=0)


def test_mixed_program_folds_the_same_way(mixed, shifted, tmp_path):
    torch.export.save(export_program(mixed, shifted[:4]), tmp_path / "mixed.pt2")
    loaded = read_model(tmp_path / "mixed.pt2")
    result = fold_batchnorm(loaded)
    assert result.folded == 2
    reasons = _reasons(result)
    assert set(reasons) == {"bn2", "bn3", "bn4"}
    assert reasons["bn2"] == "follows relu, not a conv/linear"
    assert reasons["bn3"].endswith("output also feeds 1 other node(s)")
    assert reasons["bn4"] == "follows max_pool2d, not a conv/linear"
    with torch.no_grad():
        torch.testing.assert_close(result.module(shifted), mixed(shifted), atol=1e-4, rtol=0)


def test_scripted_mixed_model_reports_what_freeze_kept(mixed, shifted, tmp_path):
    torch.jit.save(torch.jit.script(mixed), str(tmp_path / "mixed.pt"))
    loaded = read_model(tmp_path / "mixed.pt")
    result = fold_batchnorm(loaded)
    assert result.folded == 2  # freeze folds conv-BN and linear-BN too
    assert {(layer.name, layer.type) for layer in result.not_folded} == {
        ("bn2", "BatchNorm2d"),
        ("bn3", "BatchNorm2d"),
        ("bn4", "BatchNorm2d"),
    }
    with torch.no_grad():
        torch.testing.assert_close(result.module(shifted), mixed(shifted), atol=1e-4, rtol=0)


def test_untraceable_model_reports_every_bn(shifted, tmp_path):
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # data-dependent: torch.fx cannot trace it

    model = Branchy().eval()
    result = fold_batchnorm(LoadedModel(model, "module", tmp_path / "b.pt"))
    assert result.folded == 0 and len(result.not_folded) == 1
    assert result.not_folded[0].reason.startswith("model not traceable by torch.fx")
    with torch.no_grad():
        torch.testing.assert_close(result.module(shifted), model(shifted))
