"""The recalibration engine against torch's update_bn, a direct pooled computation and real data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from recalib.errors import (
    InvalidDataError,
    JobCancelledError,
    NoBatchNormError,
    StatisticsUnchangedError,
)
from tests.bn_oracle import (
    assert_statistics_equal,
    one_sample,
    pooled_bn_statistics,
    with_statistics,
)
from worker.digits import DigitsNet, accuracy
from worker.engine import recalibrate


@pytest.fixture(scope="module")
def target(digits_case) -> torch.Tensor:
    """The shifted calibration inputs (359 samples, so batches of 64 leave a partial one)."""
    return torch.from_numpy(digits_case.shifted_calibration[0])


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _dropout_free(model: DigitsNet) -> DigitsNet:
    net = DigitsNet(dropout=0.0)
    net.load_state_dict(model.state_dict())
    return net.eval()


def test_batch_mean_equals_update_bn_without_dropout(digits_case, target) -> None:
    ours, theirs = _dropout_free(digits_case.model), _dropout_free(digits_case.model)
    recalibrate(ours, target.split(64), estimator="batch_mean")
    update_bn([(x,) for x in target.split(64)], theirs)
    for key, value in _bn_state(theirs).items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    for key in ("features.1.num_batches_tracked", "head.1.num_batches_tracked"):
        assert int(ours.state_dict()[key]) == int(theirs.state_dict()[key]) == 6


def test_dropout_stays_in_eval_unlike_update_bn(digits_case, target) -> None:
    """With Dropout before BN layers our stats equal the dropout-free net's; update_bn's do not."""
    with_dropout = copy.deepcopy(digits_case.model)
    with_dropout.head[3].p = 0.5  # Dropout sits after head.1 (BN1d): put one before a BN too
    with_dropout.features.insert(3, nn.Dropout(0.5))  # between features.2 (ReLU) and the conv
    reference = copy.deepcopy(with_dropout)
    for module in reference.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ours, torchs = copy.deepcopy(with_dropout), copy.deepcopy(with_dropout)
    recalibrate(ours, target.split(64), estimator="batch_mean")
    recalibrate(reference, target.split(64), estimator="batch_mean")
    torch.manual_seed(0)
    update_bn([(x,) for x in target.split(64)], torchs)
    ours_state, ref_state, torch_state = _bn_state(ours), _bn_state(reference), _bn_state(torchs)
    for key, value in ref_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=1e-6, atol=1e-6)
    drifted = [k for k in ref_state if not torch.allclose(torch_state[k], ref_state[k], atol=1e-3)]
    assert drifted, "update_bn should see dropout noise in the layers after the Dropout"


def test_population_equals_pooled_hooked_activations(digits_case, target) -> None:
    model = copy.deepcopy(digits_case.model)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def hook(mod, args, name=name):
                x = args[0].detach().double()
                seen.setdefault(name, []).append(x.transpose(0, 1).reshape(x.shape[1], -1))

            handles.append(module.register_forward_pre_hook(hook))
    result = recalibrate(model, target.split(50))  # 7×50 + 9: a partial last batch
    for handle in handles:
        handle.remove()
    assert result.samples == len(target) and result.batches == 8
    for name, chunks in seen.items():
        pooled = torch.cat(chunks, dim=1)
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), pooled.mean(1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), pooled.var(1), atol=1e-6, rtol=1e-5)


def test_population_is_insensitive_to_batch_split(digits_case, target) -> None:
    """Element-weighted pooling: only the first BN (fed the raw data) is split-invariant exactly."""
    a, b = copy.deepcopy(digits_case.model), copy.deepcopy(digits_case.model)
    recalibrate(a, target.split(64))
    recalibrate(b, [target[:300], target[300:]])
    torch.testing.assert_close(a.features[1].running_mean, b.features[1].running_mean)
    torch.testing.assert_close(a.features[1].running_var, b.features[1].running_var)


def test_matches_the_pooled_oracle_on_shifted_digits(digits_case, target) -> None:
    """The recalibrated model is the model whose BN statistics are the pooled statistics of each
    BN layer's inputs over the target data (computed here without the engine), and so scores
    what that oracle scores."""
    model = copy.deepcopy(digits_case.model)
    order = list(range(len(target)))
    statistics = pooled_bn_statistics(digits_case.model, target, order, batch_size=64)
    oracle = with_statistics(digits_case.model, statistics)
    result = recalibrate(model, target.split(64))
    assert_statistics_equal(model, statistics)
    labels = digits_case.shifted_evaluation[1]
    assert accuracy(model, *digits_case.shifted_evaluation) == pytest.approx(
        accuracy(oracle, *digits_case.shifted_evaluation), abs=one_sample(labels)
    )
    assert result.layers == ["features.1", "features.4", "head.1"]
    assert all(change.mean_shift_std > 0.05 for change in result.changes)


def test_parameters_bit_identical_and_modes_restored(digits_case, target) -> None:
    model = copy.deepcopy(digits_case.model)
    model.head[3].train()  # a module left in train mode by the caller keeps it
    params = {k: v.clone() for k, v in model.named_parameters()}
    momenta = {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")}
    recalibrate(model, target.split(64))
    for name, value in model.named_parameters():
        assert torch.equal(value, params[name]), name
    assert {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")} == momenta
    assert model.head[3].training is True
    assert model.features[1].training is False
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_exception_mid_loop_restores_statistics(digits_case, target) -> None:
    model = copy.deepcopy(digits_case.model)
    before = _bn_state(model)

    def batches():
        yield target[:64]
        yield target[64:128]
        raise RuntimeError("data source broke")

    with pytest.raises(RuntimeError, match="data source broke"):
        recalibrate(model, batches())
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)
    assert not model.training and model.features[1].momentum == 0.1


def test_cancel_restores_and_raises(digits_case, target) -> None:
    model = copy.deepcopy(digits_case.model)
    before = _bn_state(model)
    calls = iter([False, False, True])
    with pytest.raises(JobCancelledError):
        recalibrate(model, target.split(64), should_stop=lambda: next(calls))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_deterministic(digits_case, target) -> None:
    a, b = copy.deepcopy(digits_case.model), copy.deepcopy(digits_case.model)
    recalibrate(a, target.split(32))
    recalibrate(b, target.split(32))
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_ema_moves_from_source_by_momentum(digits_case, target) -> None:
    model = copy.deepcopy(digits_case.model)
    source = model.features[1].running_mean.clone()
    batch = target[:64]
    recalibrate(model, [batch], estimator="ema", momentum=0.25)
    x = batch.reshape(64, 1, 8, 8)
    conv = digits_case.model.features[0](x)
    batch_mean = conv.mean((0, 2, 3))
    expected = 0.75 * source + 0.25 * batch_mean
    torch.testing.assert_close(model.features[1].running_mean, expected, rtol=1e-5, atol=1e-6)


def test_prior_strength_mixes_source_and_target(digits_case, target) -> None:
    pure, mixed, strong = (copy.deepcopy(digits_case.model) for _ in range(3))
    source = digits_case.model.features[1].running_mean
    recalibrate(pure, target.split(64))
    recalibrate(mixed, target.split(64), prior_strength=len(target))  # equal weights
    recalibrate(strong, target.split(64), prior_strength=1e9)
    expected = 0.5 * source + 0.5 * pure.features[1].running_mean
    torch.testing.assert_close(mixed.features[1].running_mean, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(strong.features[1].running_mean, source, rtol=1e-5, atol=1e-6)


def test_tolerance_stops_early_with_fewer_samples(digits_case, target) -> None:
    many = torch.cat([target] * 10)  # 3,590 samples from the same distribution
    model = copy.deepcopy(digits_case.model)
    result = recalibrate(model, many.split(64), tolerance=0.05, tolerance_window=3)
    assert result.stopped_early
    assert result.samples < len(many)
    # What it stored is exactly the pooled statistics of the samples it used (computed here).
    used = list(range(result.samples))
    assert_statistics_equal(
        model, pooled_bn_statistics(digits_case.model, many, used, batch_size=64)
    )


def test_single_sample_batch_is_merged(digits_case, target) -> None:
    model = copy.deepcopy(digits_case.model)
    batches = [target[:1], target[1:65], target[65:129], target[129:130]]
    result = recalibrate(model, batches)
    assert result.samples == 130 and result.merged_batches == 2 and result.batches == 2


def test_batch_size_one_is_merged_pairwise(digits_case, target) -> None:
    model = copy.deepcopy(digits_case.model)
    result = recalibrate(model, target[:6].split(1))
    assert (result.samples, result.batches, result.merged_batches) == (6, 3, 3)


def test_fewer_than_two_samples_is_an_error(digits_case, target) -> None:
    with pytest.raises(InvalidDataError, match="fewer than 2 samples"):
        recalibrate(copy.deepcopy(digits_case.model), [target[:1]])
    with pytest.raises(InvalidDataError, match="fewer than 2 samples"):
        recalibrate(copy.deepcopy(digits_case.model), [])


def test_model_without_bn_is_an_error() -> None:
    with pytest.raises(NoBatchNormError, match="no BatchNorm layers"):
        recalibrate(nn.Sequential(nn.Linear(4, 2)), [torch.randn(4, 4)])


def test_non_tensor_batch_is_an_error(digits_case) -> None:
    with pytest.raises(InvalidDataError, match="must be a tensor"):
        recalibrate(copy.deepcopy(digits_case.model), [["not", "a", "tensor"]])


def test_scripted_torchscript_matches_eager(digits_case, target) -> None:
    for estimator in ("population", "batch_mean", "ema"):
        eager = copy.deepcopy(digits_case.model)
        scripted = torch.jit.script(copy.deepcopy(digits_case.model))
        recalibrate(eager, target.split(64), estimator=estimator)
        result = recalibrate(scripted, target.split(64), estimator=estimator)
        assert result.layers == ["features.1", "features.4", "head.1"]
        for key, value in _bn_state(eager).items():
            torch.testing.assert_close(
                scripted.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=estimator
            )


def test_traced_with_training_baked_in_fails_clearly(digits_case, target) -> None:
    traced = torch.jit.trace(copy.deepcopy(digits_case.model), target[:4])
    before = _bn_state(traced)
    with pytest.raises(StatisticsUnchangedError, match=r"torch\.jit\.trace"):
        recalibrate(traced, target.split(64))
    assert all(torch.equal(traced.state_dict()[k], v) for k, v in before.items())


def test_progress_reports_each_batch(digits_case, target) -> None:
    calls: list[tuple[int, int | None]] = []
    recalibrate(
        copy.deepcopy(digits_case.model),
        target.split(100),
        total_batches=4,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_batch_forms_tuple_and_dict(digits_case, target) -> None:
    a, b, c = (copy.deepcopy(digits_case.model) for _ in range(3))
    recalibrate(a, target.split(64))
    recalibrate(b, [(x, torch.zeros(len(x))) for x in target.split(64)])
    recalibrate(c, [{"inputs": x} for x in target.split(64)])
    for key, value in _bn_state(a).items():
        assert torch.equal(b.state_dict()[key], value) and torch.equal(c.state_dict()[key], value)


def test_model_arriving_in_train_mode_leaves_in_eval(digits_case, target) -> None:
    model = copy.deepcopy(digits_case.model).train()
    recalibrate(model, target.split(64))
    assert not any(module.training for module in model.modules())
