"""Which layers the engine recalibrates and which it skips, with the reason."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tests.worker.formats_files import digits_arrays
from worker.engine import find_bn_layers, recalibrate


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's: a BN subclass that applies an activation after normalizing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision's: statistics are constant buffers, not a _BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((channels,), value))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight / self.running_var.sqrt()
        return (
            x * scale[None, :, None, None]
            + (self.bias - self.running_mean * scale)[None, :, None, None]
        )


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        BatchNormAct2d(4),
        nn.SyncBatchNorm(4),
        FrozenBatchNorm2d(4),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.LazyBatchNorm2d(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
        nn.BatchNorm1d(3),
    )


def test_finds_subclasses_sync_and_lists_skipped_with_reasons() -> None:
    model = _model()
    layers, skipped = find_bn_layers(model)
    assert [layer.name for layer in layers] == ["1", "2", "8"]
    reasons = {s.name: s.reason for s in skipped}
    assert "frozen" in reasons["3"]
    assert "track_running_stats=False" in reasons["4"]
    assert "lazy" in reasons["5"]


def test_recalibrates_subclass_sync_and_materialized_lazy_bn() -> None:
    model = _model()
    model(torch.randn(4, 1, 8, 8))  # materializes the lazy BN (it becomes a BatchNorm2d)
    model.eval()
    frozen = copy.deepcopy(model[3].state_dict())
    torch.manual_seed(0)
    data = torch.randn(64, 1, 8, 8) * 3 + 2
    result = recalibrate(model, data.split(16))
    assert result.layers == ["1", "2", "5", "8"]
    assert [s.name for s in result.skipped] == ["3", "4"]
    assert all(torch.equal(model[3].state_dict()[k], v) for k, v in frozen.items())
    assert model[5].running_mean.abs().sum() > 0  # lazy BN got real statistics


def test_unreached_layer_is_skipped_not_reported_as_recalibrated() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.BatchNorm1d(3)
            self.unused = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Branchy().eval()
    result = recalibrate(model, [torch.randn(8, 3) + 5])
    assert result.layers == ["used"]
    assert [(s.name, s.reason) for s in result.skipped] == [
        ("unused", "not reached by the forward pass in train mode")
    ]
    assert torch.equal(model.unused.running_mean, torch.zeros(3))


class BatchNormDrop2d(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BN subclass holding ``drop`` and ``act`` child modules."""

    def __init__(self, channels: int, p: float) -> None:
        super().__init__(channels)
        self.drop = nn.Dropout(p)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _drop_model(p: float) -> nn.Sequential:
    torch.manual_seed(0)  # the same weights whatever p
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        BatchNormDrop2d(8, p),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    ).eval()


def test_children_of_a_bn_subclass_stay_in_eval_mode() -> None:
    """Only the BN's own flag goes to train: its Dropout child must not drop during calibration."""
    data = torch.from_numpy(digits_arrays()[0][:256])
    model, reference = _drop_model(0.5), _drop_model(0.0)
    seen: list[bool] = []
    model[1].drop.register_forward_hook(lambda module, args, out: seen.append(module.training))
    recalibrate(model, data.split(64))
    recalibrate(reference, data.split(64))
    assert seen and not any(seen)
    for key in ("running_mean", "running_var"):
        assert torch.equal(getattr(model[3], key), getattr(reference[3], key)), key
    assert not any(module.training for module in model.modules())
