"""Hostile ONNX files (worker.onnx.load): each refused as invalid-model, naming what is wrong,
before anything is allocated from what the file declares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from recalib.errors import InvalidModelError
from tests.worker.onnx_models import GemmBN, export_dynamo, gemm_bn_graph
from worker.onnx import read_onnx, recalibrate_onnx


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def one_node(node: onnx.NodeProto, x_shape: list, opset: int = 13, **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)],
        kwargs.get("initializer", []),
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def test_a_hand_written_graph_reads_back(tmp_path):
    model = gemm_bn_graph(GemmBN().eval(), 13)
    assert read_onnx(save(model, tmp_path / "ok.onnx")) == model


def test_garbage_is_not_an_onnx_model(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\xff\xfe not a protobuf at all" * 10)
    with pytest.raises(InvalidModelError, match=r"garbage.onnx: not a readable ONNX model"):
        read_onnx(path)


def test_a_file_near_the_protobuf_limit_is_refused_before_reading(tmp_path):
    path = save(gemm_bn_graph(GemmBN().eval(), 13), tmp_path / "big.onnx")
    with pytest.raises(InvalidModelError, match="over 1000 bytes are refused"):
        read_onnx(path, max_file_bytes=1000)


def test_a_custom_domain_operator_is_refused_by_name(tmp_path):
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="evil", domain="com.example")
    model = one_node(node, ["N", 4])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(InvalidModelError, match=r"'evil'.*com\.example::Frobnicate"):
        read_onnx(save(model, tmp_path / "custom.onnx"))


def test_a_huge_declared_input_shape_is_refused(tmp_path):
    model = one_node(helper.make_node("Relu", ["x"], ["y"], name="r"), [10**6, 10**6, 1000])
    with pytest.raises(InvalidModelError, match=r"tensor 'x' declares shape \[1000000, 1000000"):
        read_onnx(save(model, tmp_path / "huge-input.onnx"))


def test_a_huge_computed_constant_is_refused_before_running(tmp_path):
    shape = numpy_helper.from_array(np.array([10**5, 10**5, 10**3], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], name="fill"),
        helper.make_node("Add", ["x", "big"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c"])],
        [shape],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    with pytest.raises(InvalidModelError, match="'big' would compute shape"):
        read_onnx(save(model, tmp_path / "bomb.onnx"))


def test_an_initializer_declaring_more_values_than_it_stores_is_refused(tmp_path):
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1000, 1000])
    tensor.raw_data = b"\x00" * 16
    node = helper.make_node("Add", ["x", "w"], ["y"], name="add")
    model = one_node(node, ["N", 1000], initializer=[tensor])
    with pytest.raises(InvalidModelError, match=r"'w' declares shape \[1000, 1000\].*stores 4"):
        read_onnx(save(model, tmp_path / "liar.onnx"))
    tensor.dims[:] = [10**7, 10**6]
    model = one_node(node, ["N", 1000], initializer=[tensor])
    with pytest.raises(InvalidModelError, match=r"tensors over .* bytes are refused"):
        read_onnx(save(model, tmp_path / "liar2.onnx"))


def test_too_old_an_opset_is_refused(tmp_path):
    model = one_node(helper.make_node("Relu", ["x"], ["y"], name="r"), ["N"], opset=7)
    model.ir_version = 3
    with pytest.raises(InvalidModelError, match="opset 7"):
        read_onnx(save(model, tmp_path / "old.onnx"))


def _with_external_data(tmp_path: Path, location: str) -> Path:
    """The Gemm-BN graph whose weight ``W`` names ``location`` as its external data."""
    model = gemm_bn_graph(GemmBN().eval(), 13)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    return save(model, tmp_path / "model" / "ext.onnx")


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_outside_the_artifact_is_refused_naming_the_path(tmp_path, location):
    (tmp_path / "model").mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 4 * 640)
    path = _with_external_data(tmp_path, location)
    with pytest.raises(InvalidModelError, match=rf"{location!r}.*outside the model's artifact"):
        read_onnx(path, artifact_dir=tmp_path / "model")


def test_external_data_in_a_single_uploaded_file_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    path = _with_external_data(tmp_path, "weights.bin")
    with pytest.raises(InvalidModelError, match=r"'weights\.bin'; a single uploaded \.onnx file"):
        read_onnx(path)


@pytest.mark.slow
def test_external_data_inside_the_artifact_is_read(digits_case, tmp_path):
    """torch's dynamo exporter writes its weights beside the model by default."""
    folder = tmp_path / "artifact"
    folder.mkdir()
    x = torch.from_numpy(digits_case.shifted_calibration[0])
    path = export_dynamo(digits_case.model, (x[:4],), folder / "digits.onnx", external=True)
    assert len(list(folder.iterdir())) == 2  # the model and its .data file
    model = read_onnx(path, artifact_dir=folder)
    done = recalibrate_onnx(model, list(x.split(32)))
    assert len(done.result.layers) == 3


_ALLOCATE_AT_RUN_TIME = """
import resource, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from recalib.errors import InvalidModelError
from worker.onnx.session import make_session, run_session

# The shape comes from the input's values: no static check can see it (the sandbox's memory
# rlimit is what stops it; here the same rlimit, 2 GiB of address space).
resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))
nodes = [
    helper.make_node("Cast", ["n"], ["n64"], name="to_int", to=TensorProto.INT64),
    helper.make_node("ConstantOfShape", ["n64"], ["big"], name="fill"),
    helper.make_node("ReduceSum", ["big"], ["y"], name="sum", keepdims=0),
]
graph = helper.make_graph(
    nodes, "g", [helper.make_tensor_value_info("n", TensorProto.FLOAT, [2])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 7
session = make_session(model, "bomb.onnx", threads=1)
try:
    run_session(session, None, {"n": np.array([1e5, 1e5], dtype=np.float32)}, "bomb.onnx")
except InvalidModelError as exc:
    print("REFUSED", exc)
    sys.exit(0)
print("RAN")
sys.exit(1)
"""


def test_a_graph_allocating_beyond_the_memory_limit_at_run_time_fails_cleanly():
    """40 GB asked for by values known only at run time, under a 2 GiB rlimit: invalid-model,
    the process alive to report it."""
    import subprocess
    import sys

    from tests.live import REPO_ROOT

    done = subprocess.run(
        [sys.executable, "-c", _ALLOCATE_AT_RUN_TIME], capture_output=True, text=True,
        timeout=120, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REFUSED bomb.onnx: ONNX Runtime" in done.stdout
