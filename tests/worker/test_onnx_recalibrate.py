"""ONNX recalibration (worker.onnx) against torch's own BN kernel, on a shifted digits domain.

Each ONNX model (exported by both torch exporters, or written with onnx.helper) is recalibrated by
ONNX Runtime; its outputs must equal the torch oracle's (tests/worker/onnx_models.py) to 1e-4 of
the logits' scale, and only its BN running mean/variance initializers may differ from the input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from recalib.errors import InvalidDataError, InvalidModelError, NoBatchNormError
from tests.worker.onnx_models import (
    GemmBN,
    TwoInputNet,
    bn_if_graph,
    export_dynamo,
    export_legacy,
    gemm_bn_graph,
    torch_oracle,
)
from worker.digits import DigitsNet
from worker.onnx import read_onnx, recalibrate_onnx
from worker.onnx.session import make_session

BATCH = 32
ESTIMATORS = [("population", 0.0), ("batch_mean", 0.0), ("ema", 0.0), ("population", 100.0)]


def batches(x: torch.Tensor, size: int = BATCH) -> list[torch.Tensor]:
    return list(x.split(size))


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(model, "test").run(None, feeds)[0]


def assert_logits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Equal to 1e-4 of the logits' scale (float32 rounding of the two runtimes)."""
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= 1e-4 * scale, (np.abs(got - want).max(), scale)


def assert_only_bn_statistics_changed(
    before: onnx.ModelProto, after: onnx.ModelProto, bn_stats: set[str]
) -> None:
    """Same nodes, names, opset, metadata and initializers, except the BN mean/var ones."""
    assert [n.SerializeToString() for n in after.graph.node] == [
        n.SerializeToString() for n in before.graph.node
    ]
    assert list(after.opset_import) == list(before.opset_import)
    assert list(after.metadata_props) == list(before.metadata_props)
    assert after.ir_version == before.ir_version
    assert list(after.graph.input) == list(before.graph.input)
    assert list(after.graph.output) == list(before.graph.output)
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert new.keys() == old.keys()
    for name, value in old.items():
        if name in bn_stats:
            assert not np.array_equal(new[name], value), f"{name} unchanged"
            assert new[name].dtype == value.dtype and new[name].shape == value.shape
        else:
            np.testing.assert_array_equal(new[name], value, err_msg=name)


def bn_statistic_names(model: onnx.ModelProto) -> set[str]:
    return {
        n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)
    }


@pytest.fixture(scope="module")
def digits(digits_case):
    net = digits_case.model
    calibration = torch.from_numpy(digits_case.shifted_calibration[0])
    evaluation = digits_case.shifted_evaluation[0]
    return net, calibration, evaluation


@pytest.fixture(scope="module")
def digits_exports(digits, tmp_path_factory) -> dict[str, Path]:
    net, calibration, _ = digits
    folder = tmp_path_factory.mktemp("onnx")
    example = (calibration[:4],)
    return {
        "legacy-13": export_legacy(net, example, folder / "legacy13.onnx", opset=13),
        "legacy-18": export_legacy(net, example, folder / "legacy18.onnx", opset=18),
        "dynamo-18": export_dynamo(net, example, folder / "dynamo.onnx"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy-13", "legacy-18", "dynamo-18"])
@pytest.mark.parametrize(("estimator", "prior_strength"), ESTIMATORS)
def test_torch_exports_equal_the_torch_bn_oracle(
    digits, digits_exports, exporter, estimator, prior_strength
):
    net, calibration, evaluation = digits
    model = read_onnx(digits_exports[exporter])
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (13 if exporter == "legacy-13" else opset) and (
        exporter == "legacy-13" or opset >= 18
    )
    done = recalibrate_onnx(
        model,
        batches(calibration),
        estimator=estimator,
        momentum=0.1,
        prior_strength=prior_strength,
    )
    order = range(len(calibration))
    oracle = torch_oracle(
        net, lambda m, idx: m(calibration[idx]), order, BATCH, estimator, 0.1, prior_strength
    )
    name = model.graph.input[0].name
    with torch.no_grad():
        want = oracle(torch.from_numpy(evaluation)).numpy()
    assert_logits_equal(run_onnx(done.model, {name: evaluation}), want)
    assert_only_bn_statistics_changed(model, done.model, _stored_stats(model))
    assert len(done.result.layers) == 3 and done.result.samples == len(calibration)
    # and recalibration mattered: the source model's logits are far from the oracle's
    assert np.abs(run_onnx(model, {name: evaluation}) - want).max() > 0.1


def _stored_stats(model: onnx.ModelProto) -> set[str]:
    """BN mean/var initializer names, through the Identity nodes torch's legacy exporter adds."""
    producers = {o: n for n in model.graph.node for o in n.output}
    stored = {t.name for t in model.graph.initializer}
    names = set()
    for value in bn_statistic_names(model):
        while value not in stored:
            value = producers[value].input[0]
        names.add(value)
    return names


@pytest.mark.parametrize("opset", [9, 13, 18])
@pytest.mark.parametrize("estimator", ["population", "batch_mean", "ema"])
def test_a_hand_written_gemm_bn_graph_equals_the_oracle(digits, opset, estimator):
    _, calibration, evaluation = digits
    torch.manual_seed(0)
    twin = GemmBN().eval()
    with torch.no_grad():
        twin.bn.running_mean.uniform_(-1, 1)
        twin.bn.running_var.uniform_(0.5, 2)
        twin.bn.weight.uniform_(0.5, 1.5)
        twin.bn.bias.uniform_(-0.5, 0.5)
    model = gemm_bn_graph(twin, opset)
    flat = calibration.reshape(len(calibration), -1)
    done = recalibrate_onnx(model, batches(flat), estimator=estimator)
    oracle = torch_oracle(twin, lambda m, idx: m(flat[idx]), range(len(flat)), BATCH, estimator)
    x = evaluation.reshape(len(evaluation), -1)
    with torch.no_grad():
        want = oracle(torch.from_numpy(x)).numpy()
    assert_logits_equal(run_onnx(done.model, {"x": x}), want)
    assert_only_bn_statistics_changed(model, done.model, {"mu", "sigma2"})
    assert done.result.layers == ["dense_bn"]


@pytest.mark.slow
def test_a_fixed_batch_export_takes_only_full_batches(digits, tmp_path):
    net, calibration, evaluation = digits
    size = 16
    path = export_legacy(
        net, (calibration[:size],), tmp_path / "fixed.onnx", opset=13, dynamic=False
    )
    model = read_onnx(path)
    done = recalibrate_onnx(model, batches(calibration, size))
    full = len(calibration) // size * size
    assert done.result.dropped_samples == len(calibration) - full
    assert done.result.samples == full
    oracle = torch_oracle(net, lambda m, idx: m(calibration[idx]), range(full), size, "population")
    with torch.no_grad():
        want = oracle(torch.from_numpy(evaluation[:size])).numpy()
    assert_logits_equal(run_onnx(done.model, {"x": evaluation[:size]}), want)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_two_input_graph_is_fed_by_name(tmp_path, exporter):
    torch.manual_seed(0)
    net = TwoInputNet().eval()
    for bn in (net.bn1, net.bn3):  # distinct values: no tensor the exporter would store once
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
    rng = np.random.default_rng(0)
    signal = torch.from_numpy(rng.normal(2.0, 3.0, (96, 3, 12)).astype(np.float32))
    volume = torch.from_numpy(rng.normal(-1.0, 0.5, (96, 2, 4, 5, 6)).astype(np.float32))
    example = (signal[:4], volume[:4])
    path = tmp_path / "two.onnx"
    if exporter == "legacy":
        export_legacy(net, example, path, opset=17, input_names=("signal", "volume"))
    else:
        export_dynamo(net, example, path)
    model = read_onnx(path)
    assert [i.name for i in model.graph.input] == ["signal", "volume"]
    calib = [
        {"signal": s, "volume": v}
        for s, v in zip(signal[:64].split(16), volume[:64].split(16), strict=True)
    ]
    done = recalibrate_onnx(model, calib, input_fn=lambda batch: batch)
    oracle = torch_oracle(
        net, lambda m, idx: m(signal[idx], volume[idx]), range(64), 16, "population"
    )
    with torch.no_grad():
        want = oracle(signal[64:], volume[64:]).numpy()
    got = run_onnx(done.model, {"signal": signal[64:].numpy(), "volume": volume[64:].numpy()})
    assert_logits_equal(got, want)
    assert_only_bn_statistics_changed(model, done.model, _stored_stats(model))
    with pytest.raises(InvalidDataError, match="signal, volume"):
        recalibrate_onnx(model, [signal[:8]])


def test_equal_statistics_shared_by_the_legacy_exporter_are_written_apart(digits, tmp_path):
    _, calibration, evaluation = digits
    torch.manual_seed(0)
    fresh = DigitsNet().eval()  # untrained: mean 0 = bias, var 1 = weight
    model = read_onnx(export_legacy(fresh, (calibration[:4],), tmp_path / "f.onnx", opset=13))
    # the exporter stored each BN's zeros/ones once, shared with its bias/weight
    assert all(name.endswith((".weight", ".bias")) for name in _stored_stats(model))
    done = recalibrate_onnx(model, batches(calibration))
    oracle = torch_oracle(
        fresh, lambda m, idx: m(calibration[idx]), range(len(calibration)), BATCH, "population"
    )
    with torch.no_grad():
        want = oracle(torch.from_numpy(evaluation)).numpy()
    assert_logits_equal(run_onnx(done.model, {"x": evaluation}), want)
    # each shared statistic got an initializer of its own; the shared one kept its values
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in done.model.graph.initializer}
    assert old.keys() < new.keys()
    for name, value in old.items():
        np.testing.assert_array_equal(new[name], value)
    assert [n.op_type for n in done.model.graph.node] == [n.op_type for n in model.graph.node]


@pytest.mark.slow
def test_a_folded_export_is_refused_with_the_advice(digits, tmp_path):
    net, calibration, _ = digits
    path = export_dynamo(net, (calibration[:4],), tmp_path / "folded.onnx", optimize=True)
    with pytest.raises(NoBatchNormError) as caught:
        recalibrate_onnx(read_onnx(path), batches(calibration))
    message = str(caught.value)
    assert "folded" in message
    assert "optimize=False" in message
    assert "TrainingMode.PRESERVE" in message and "do_constant_folding=False" in message
    assert "tf2onnx" in message


def test_a_bn_inside_an_if_branch_is_refused_by_name():
    with pytest.raises(InvalidModelError, match=r"'branch_bn'.*If 'choose'"):
        recalibrate_onnx(bn_if_graph(), [torch.zeros(4, 2)])


def test_one_sample_batches_are_merged_and_a_single_sample_refused(digits):
    _, calibration, _ = digits
    torch.manual_seed(0)
    model = gemm_bn_graph(GemmBN().eval(), 13)
    flat = calibration.reshape(len(calibration), -1)
    done = recalibrate_onnx(model, batches(flat[:5], 1))
    assert done.result.samples == 5 and done.result.merged_batches >= 2
    with pytest.raises(InvalidDataError, match="fewer than 2 samples"):
        recalibrate_onnx(model, batches(flat[:1], 1))


@pytest.mark.parametrize("exporter", ["legacy-13", "legacy-18", "dynamo-18"])
def test_training_mode_bn_measures_what_the_reducemean_rewrite_does(
    digits, digits_exports, exporter
):
    """The CPU provider's fused training-mode BN (opset >= 14) and the ReduceMean rewrite (every
    provider) give each node the same batch mean and biased variance; opset 13 keeps the rewrite."""
    from worker.onnx.graph import find_bn_nodes, statistics_graph

    _, calibration, _ = digits
    model = read_onnx(digits_exports[exporter])
    nodes, _ = find_bn_nodes(model, "m.onnx")
    name = model.graph.input[0].name
    results = []
    for training_bn in (False, True):
        graph, outputs = statistics_graph(model, nodes, training_bn=training_bn)
        kinds = [a.i for n in graph.graph.node if n.op_type == "BatchNormalization"
                 for a in n.attribute if a.name == "training_mode" and a.i == 1]  # fmt: skip
        assert len(kinds) == (len(nodes) if training_bn and exporter != "legacy-13" else 0)
        names = [n for out in outputs for n in (out.mean, out.var)]
        batch = np.ascontiguousarray(np.asarray(calibration[:BATCH]), dtype=np.float32)
        results.append(make_session(graph, "m").run(names, {name: batch}))
    for plain, fused in zip(*results, strict=True):
        np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-6)
