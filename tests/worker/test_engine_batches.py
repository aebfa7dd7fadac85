"""The engine's batch stream and per-call statistics: single-sample merges, shared BN modules,
models that accept only some batch sizes."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from recalib.errors import InvalidModelError, JobCancelledError
from tests.worker.formats_files import digits_arrays
from worker.digits import DigitsNet
from worker.engine import recalibrate


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    """Shifted digits, 1×8×8 (no trained model needed: the statistics are what is checked)."""
    return torch.from_numpy(digits_arrays()[0][:400])


def _net() -> DigitsNet:
    torch.manual_seed(0)
    return DigitsNet().eval()


def _record_inputs(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every call's input of every BN layer, as (channels, elements) float64."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def hook(mod, args, name=name):
                x = args[0].detach().double()
                seen.setdefault(name, []).append(x.transpose(0, 1).reshape(x.shape[1], -1))

            module.register_forward_pre_hook(hook)
    return seen


def _assert_pooled(model: nn.Module, seen: dict[str, list[torch.Tensor]]) -> None:
    assert seen
    for name, chunks in seen.items():
        pooled = torch.cat(chunks, dim=1)
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), pooled.mean(1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), pooled.var(1), atol=1e-6, rtol=1e-5)


# --- batch_size=1: pairs, bounded memory, cancel ------------------------------------------------


def test_batch_size_one_forms_pairs_and_pools_every_sample(data) -> None:
    model = _net()
    seen = _record_inputs(model)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    progress: list[tuple[int, int | None]] = []
    result = recalibrate(
        model,
        data[:200].split(1),
        total_batches=200,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert (result.samples, result.batches, result.merged_batches) == (200, 100, 100)
    assert sizes == [2] * 100
    assert progress[-1] == (200, 200) and len(progress) == 100
    _assert_pooled(model, seen)


def test_odd_count_trailing_single_joins_the_last_pair(data) -> None:
    model = _net()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    result = recalibrate(model, data[:201].split(1))
    assert (result.samples, result.batches, result.merged_batches) == (201, 100, 101)
    assert sizes == [2] * 99 + [3]


def test_single_batches_between_full_ones_merge_with_one_neighbour_only(data) -> None:
    model = _net()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    batches = [data[:1], data[1:2], data[2:3], data[3:67], data[67:68], data[68:132]]
    result = recalibrate(model, batches)
    assert sizes == [2, 65, 65]  # [1]+[1]; the third [1] takes the next [64], and so on
    assert (result.samples, result.batches, result.merged_batches) == (132, 3, 3)


def test_cancel_with_batch_size_one_stops_within_a_few_batches(data) -> None:
    pulled = 0

    def endless() -> Iterator[torch.Tensor]:
        nonlocal pulled
        for index in range(3000):
            pulled += 1
            yield data[index % len(data)][None]

    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return polls >= 3

    model = _net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(JobCancelledError):
        recalibrate(model, endless(), should_stop=should_stop)
    assert polls == 3
    assert pulled <= 8  # two forwarded pairs, the third pair read ahead
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --- a BN module called more than once per forward ---------------------------------------------


class SharedBN(nn.Module):
    """One BN normalizes two differently distributed branches (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 64, 10), nn.BatchNorm1d(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(self.conv_a(x))
        b = self.bn(self.conv_b(x) * 3.0 + 2.0)
        return self.head(a + b)


def _shared() -> SharedBN:
    torch.manual_seed(0)
    return SharedBN().eval()


def test_shared_bn_population_pools_every_call(data) -> None:
    model = _shared()
    seen = _record_inputs(model)
    result = recalibrate(model, data.split(64))
    assert len(seen["bn"]) == 2 * result.batches
    _assert_pooled(model, seen)
    assert int(model.bn.num_batches_tracked) == 2 * result.batches  # every call counts, as in BN


def test_shared_bn_batch_mean_and_ema_count_every_call_as_one_update(data) -> None:
    for estimator in ("batch_mean", "ema"):
        model = _shared()
        source_mean, source_var = model.bn.running_mean.clone(), model.bn.running_var.clone()
        seen = _record_inputs(model)
        recalibrate(model, data.split(64), estimator=estimator, momentum=0.2)
        calls = [(x.mean(1), x.var(1)) for x in seen["bn"]]
        if estimator == "batch_mean":
            mean = torch.stack([m for m, _ in calls]).mean(0)
            var = torch.stack([v for _, v in calls]).mean(0)
        else:
            mean, var = source_mean.double(), source_var.double()
            for call_mean, call_var in calls:
                mean, var = 0.8 * mean + 0.2 * call_mean, 0.8 * var + 0.2 * call_var
        torch.testing.assert_close(model.bn.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.bn.running_var.double(), var, atol=1e-5, rtol=1e-5)


def test_shared_bn_in_torchscript_is_refused_by_name(data) -> None:
    scripted = torch.jit.script(_shared())
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    with pytest.raises(InvalidModelError, match=r"'bn'.*2 times"):
        recalibrate(scripted, data.split(64))
    assert all(torch.equal(scripted.state_dict()[k], v) for k, v in before.items())


# --- models that accept only some batch sizes (torch.export programs) ---------------------------


def test_fixed_batch_size_drops_the_short_remainder(data) -> None:
    model, reference = _net(), _net()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    result = recalibrate(model, data[:359].split(5), batch_size_range=(5, 5))
    assert (result.samples, result.batches, result.dropped_samples) == (355, 71, 4)
    assert set(sizes) == {5}
    recalibrate(reference, data[:355].split(5))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_bounded_batch_size_never_merges_past_the_maximum(data) -> None:
    model = _net()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    batches = [data[:8], data[8:9], data[9:17], data[17:18]]
    result = recalibrate(model, batches, batch_size_range=(1, 8))
    # no neighbour can take a single without exceeding 8: both are dropped, not forwarded alone
    assert sizes == [8, 8]
    assert (result.samples, result.dropped_samples, result.merged_batches) == (16, 2, 0)


def test_batch_size_one_only_model_with_one_value_per_channel_is_refused(data) -> None:
    model = _net()  # head.1 is a BatchNorm1d: one value per channel for a single sample
    with pytest.raises(InvalidModelError, match=r"head\.1.*dynamic batch"):
        recalibrate(model, data[:20].split(1), batch_size_range=(1, 1))


def test_batch_size_one_only_model_with_spatial_bn_calibrates_per_sample(data) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(256, 10)
    ).eval()
    seen = _record_inputs(model)
    result = recalibrate(model, data[:20].split(1), batch_size_range=(1, 1))
    assert (result.samples, result.batches, result.merged_batches) == (20, 20, 0)
    _assert_pooled(model, seen)
