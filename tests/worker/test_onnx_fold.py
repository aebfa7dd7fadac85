"""worker/onnx/fold.py: BN folded into the Conv/Gemm before it, outputs unchanged.

Each case recalibrates first (so the statistics folded are the new ones, not the exporter's
defaults), folds, and compares the folded graph's outputs with the unfolded graph's in ONNX
Runtime on held-out data: equal to 1e-4 of the logits' scale, no BatchNormalization node left
where one could fold, and the ones that could not listed with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.worker.onnx_models import GemmBN, export_dynamo, export_legacy, gemm_bn_graph
from tests.worker.test_onnx_recalibrate import assert_logits_equal, batches, run_onnx
from worker.onnx import recalibrate_onnx
from worker.onnx.fold import fold_bn_nodes


def _bn_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


@pytest.fixture(scope="module")
def digits(digits_case):
    calibration = torch.from_numpy(digits_case.shifted_calibration[0])
    return digits_case.model, calibration, digits_case.shifted_evaluation[0]


@pytest.mark.parametrize("exporter", ["legacy-13", "dynamo-18"])
def test_a_recalibrated_cnn_folds_every_bn_and_keeps_its_outputs(digits, tmp_path, exporter):
    net, calibration, evaluation = digits
    example = (calibration[:4],)
    if exporter == "legacy-13":
        path = export_legacy(net, example, tmp_path / "m.onnx", opset=13)
    else:
        path = export_dynamo(net, example, tmp_path / "m.onnx")
    recalibrated = recalibrate_onnx(onnx.load(path), batches(calibration)).model
    bns = _bn_count(recalibrated)
    assert bns >= 2
    fold = fold_bn_nodes(recalibrated, "m.onnx")
    assert len(fold.folded) == bns and fold.not_folded == []
    assert _bn_count(fold.model) == 0
    onnx.checker.check_model(fold.model)
    feeds = {recalibrated.graph.input[0].name: evaluation}
    assert_logits_equal(run_onnx(fold.model, feeds), run_onnx(recalibrated, feeds))
    assert _bn_count(recalibrated) == bns  # the input is left as it was


@pytest.mark.parametrize(("trans_b", "bias"), [(1, True), (0, True), (1, False)])
def test_a_gemm_folds_whatever_its_weight_layout_and_bias(digits, trans_b, bias):
    _, calibration, evaluation = digits
    torch.manual_seed(0)
    model = gemm_bn_graph(GemmBN().eval(), opset=13)
    gemm = model.graph.node[0]
    weights = {t.name: t for t in model.graph.initializer}
    if not trans_b:  # the same layer stored as (K, N)
        w = numpy_helper.to_array(weights["W"])
        weights["W"].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), "W"))
        gemm.ClearField("attribute")
    if not bias:
        del gemm.input[2]
    flat = calibration.reshape(len(calibration), -1)
    recalibrated = recalibrate_onnx(model, batches(flat)).model
    fold = fold_bn_nodes(recalibrated, "gemm")
    assert fold.folded == ["dense_bn"] and _bn_count(fold.model) == 0
    x = evaluation.reshape(len(evaluation), -1)
    assert_logits_equal(run_onnx(fold.model, {"x": x}), run_onnx(recalibrated, {"x": x}))


def test_a_bn_whose_input_is_read_elsewhere_stays_with_the_reason(digits):
    _, calibration, evaluation = digits
    torch.manual_seed(0)
    model = gemm_bn_graph(GemmBN().eval(), opset=13)
    graph = model.graph
    graph.node.append(helper.make_node("Relu", ["h"], ["h_relu"], name="side"))
    graph.output.append(helper.make_tensor_value_info("h_relu", TensorProto.FLOAT, ["N", 10]))
    flat = calibration.reshape(len(calibration), -1)
    recalibrated = recalibrate_onnx(model, batches(flat)).model
    fold = fold_bn_nodes(recalibrated, "gemm")
    assert fold.folded == []
    assert [(s.name, s.reason) for s in fold.not_folded] == [
        ("dense_bn", "the Gemm's output is read by other nodes too")
    ]
    x = evaluation.reshape(len(evaluation), -1)
    assert_logits_equal(run_onnx(fold.model, {"x": x}), run_onnx(recalibrated, {"x": x}))
