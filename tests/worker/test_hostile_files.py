"""Hostile model and data files: payloads that would run code must never run.

Every payload runs ``touch <marker>`` when unpickled/evaluated. The ``*_payload_is_live`` tests
prove each tampered file really does run code when handed to torch's own loader, so that the
refusal tests below it are meaningful.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from recalib.errors import InvalidDataError, InvalidModelError, UnsafePickleError
from tests.worker.formats_files import (
    DIGITS_ALLOWLIST,
    DIGITS_ARCH,
    Payload,
    digits_arrays,
    export_program,
    rewrite_zip,
)
from worker.digits import DigitsNet
from worker.formats.data import open_samples
from worker.formats.models import read_model
from worker.formats.pt2_checks import check_expr, check_guard

ARCH = {"arch": DIGITS_ARCH, "arch_allowlist": DIGITS_ALLOWLIST}


@pytest.fixture(scope="module")
def clean_files(tmp_path_factory):
    """An untrained DigitsNet is enough: these tests are about what loading runs, not accuracy."""
    out = tmp_path_factory.mktemp("clean")
    model = DigitsNet().eval()
    example = torch.from_numpy(digits_arrays()[0][:4])
    torch.export.save(export_program(model, example), out / "digits.pt2")
    torch.jit.save(torch.jit.script(model), str(out / "scripted.pt"))
    return {"pt2": out / "digits.pt2", "torchscript": out / "scripted.pt"}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran"


def _torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------ pickled .pt files


def test_whole_module_payload_is_refused(marker, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(Payload(marker), path)
    with pytest.raises(
        UnsafePickleError, match=r"evil\.pt: .*references posix\.system.*arbitrary code"
    ):
        read_model(path)
    assert not marker.exists()


def test_state_dict_with_payload_is_refused_even_with_arch(marker, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"features.0.weight": torch.zeros(3), "x": Payload(marker)}, path)
    with pytest.raises(UnsafePickleError, match="--allow-unsafe-pickle"):
        read_model(path, **ARCH)
    assert not marker.exists()


def test_pickle_payload_is_live(tmp_path):
    """Control: the same payload does run under a full unpickle (so the refusals above count)."""
    control = tmp_path / "PWNED-control"
    torch.save(Payload(control), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert control.exists()


# ------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_tampered_torchscript_pickle_runs_nothing(member, clean_files, marker, tmp_path):
    evil = pickle.dumps(Payload(marker), protocol=2)
    path = rewrite_zip(
        clean_files["torchscript"],
        tmp_path / "ts.pt",
        lambda n, d: evil if n.endswith(f"/{member}") else d,
    )
    with pytest.raises(InvalidModelError, match=r"ts\.pt: cannot load this TorchScript archive"):
        read_model(path)
    assert not marker.exists()


# ------------------------------------------------------------------ .pt2 programs


def _program_json(change):
    def rewrite(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(data)
            change(program)
            return json.dumps(program).encode()
        return data

    return rewrite


def _evil_sample_inputs(marker):
    evil = _torch_save_bytes(Payload(marker))
    return lambda name, data: evil if "sample_inputs/" in name else data


def _evil_expr(marker):
    call = f"__import__('os').system('touch {marker}')"
    expr = f"Symbol('s77', positive=True, integer=True) if {call} == 0 else 0"

    def change(program):
        for value in program["graph_module"]["graph"]["tensor_values"].values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = expr

    return _program_json(change)


def _evil_guard(marker):
    guard = f"__import__('os').system('touch {marker}') == 0"
    return _program_json(lambda program: program["guards_code"].append(guard))


def _evil_pickled_weight(marker):
    evil = _torch_save_bytes(Payload(marker))

    def rewrite(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["features.0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return evil
        return data

    return rewrite


def test_pt2_payloads_are_live(clean_files, tmp_path):
    """Control: torch.export.load itself runs each of these payloads (torch 2.13)."""
    x = torch.zeros(2, 1, 8, 8)
    for make in (_evil_sample_inputs, _evil_expr, _evil_guard, _evil_pickled_weight):
        control = tmp_path / f"PWNED-control-{make.__name__}"
        path = rewrite_zip(clean_files["pt2"], tmp_path / f"{make.__name__}.pt2", make(control))
        with contextlib.suppress(Exception):  # some payloads break the program after they ran
            torch.export.load(path).module()(x)
        assert control.exists(), make.__name__


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (_evil_sample_inputs, UnsafePickleError, r"sample_inputs/model\.pt .*posix\.system"),
        (_evil_expr, InvalidModelError, r"unsafe symbolic expression .*: unknown name 'if'"),
        (_evil_guard, InvalidModelError, r"unsafe guard .*Call|unsafe guard .*__import__"),
        (_evil_pickled_weight, UnsafePickleError, r"data/weights/weight_0 .*posix\.system"),
    ],
)
def test_tampered_pt2_runs_nothing(make, error, message, clean_files, marker, tmp_path):
    path = rewrite_zip(clean_files["pt2"], tmp_path / "evil.pt2", make(marker))
    with pytest.raises(error, match=message) as info:
        read_model(path)
    assert info.value.file == str(path)
    assert not marker.exists()


def test_pt2_graph_calling_a_python_function_is_refused(clean_files, marker, tmp_path):
    def change(program):
        for node in program["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.os.system"  # resolves: torch imports os

    path = rewrite_zip(clean_files["pt2"], tmp_path / "calls.pt2", _program_json(change))
    with pytest.raises(
        InvalidModelError, match=r"calls\.pt2: .*(not a torch operator|torch\.export\.load failed)"
    ):
        read_model(path)
    assert not marker.exists()


def test_pt2_with_native_code_or_stray_members_is_refused(clean_files, tmp_path):
    def with_member(name: str):
        path = rewrite_zip(clean_files["pt2"], tmp_path / "x.pt2", lambda n, d: d)
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(name, b"\x7fELF")
        return path

    with pytest.raises(InvalidModelError, match="AOTInductor packages hold compiled native code"):
        read_model(with_member("digits/data/aotinductor/model/model.so"))
    with pytest.raises(InvalidModelError, match=r"member 'digits/\.\./version' lies outside"):
        read_model(with_member("digits/../version"))
    # torch.export.load's legacy fallback reads a top-level "version": not a .pt2 to us at all.
    with pytest.raises(InvalidModelError, match=r"x\.pt2: a zip archive, but not a torch\.export"):
        read_model(with_member("version"))


def test_expression_and_guard_checks_accept_real_exports():
    assert (
        check_expr("Add(Mul(Integer(2), Symbol('s0', integer=True, positive=True)), Integer(1))")
        is None
    )
    assert check_expr("FloorDiv(Symbol('s77', positive=True, integer=True), Integer(2))") is None
    assert check_expr("Mul(Float('1.5', precision=53), Symbol('s0'))") is None
    assert check_expr("Symbol('s0').__class__") is not None
    assert check_expr("exec(chr(112))") == "unknown name 'exec'"
    assert check_guard("L['x'].size()[1] <= L['y'].size()[1]") is None
    assert check_guard("L['x'].size()[0] == L['y'].size()[0] and L['x'].stride()[0] > 2") is None
    assert check_guard("L['x'].__class__") == "attribute '__class__' is not allowed"
    assert check_guard("(lambda: 1)()") is not None


# ------------------------------------------------------------------ data files


def test_npz_object_arrays_fail_without_unpickling(marker, tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, inputs=np.array([Payload(marker)], dtype=object))
    with pytest.raises(
        InvalidDataError, match=r"objects\.npz holds object arrays .*never unpickles"
    ):
        open_samples(path)
    assert not marker.exists()


def test_pt_data_with_payload_is_refused(marker, tmp_path):
    path = tmp_path / "data.pt"
    torch.save({"inputs": torch.zeros(4, 3), "labels": Payload(marker)}, path)
    with pytest.raises(UnsafePickleError, match=r"data\.pt .*posix\.system.*never unpickled"):
        open_samples(path)
    assert not marker.exists()


def test_graph_target_check_allows_operators_only(clean_files):
    from types import SimpleNamespace

    from torch import fx

    from worker.formats.pt2_checks import check_graph_targets

    program = torch.export.load(clean_files["pt2"])
    check_graph_targets(program, clean_files["pt2"])  # aten operators only: accepted
    python_call = fx.symbolic_trace(lambda x: torch.relu(x) + 1)  # torch.relu: a Python binding
    with pytest.raises(InvalidModelError, match=r"calls torch\..*relu, which is not a torch op"):
        check_graph_targets(SimpleNamespace(graph_module=python_call), clean_files["pt2"])
    graph = fx.Graph()
    path_node = graph.placeholder("path")
    graph.output(graph.call_function(torch.ops.aten.from_file.default, (path_node,)))
    with pytest.raises(InvalidModelError, match="from_file"):
        check_graph_targets(
            SimpleNamespace(graph_module=fx.GraphModule({}, graph)), clean_files["pt2"]
        )


def test_every_program_in_the_archive_is_vetted(clean_files, marker, tmp_path):
    """torch.export.load deserializes *all* models/* members, not only "model"."""
    evil_json = _evil_expr(marker)
    path = rewrite_zip(clean_files["pt2"], tmp_path / "two.pt2", lambda n, d: d)
    with zipfile.ZipFile(clean_files["pt2"]) as clean, zipfile.ZipFile(path, "a") as archive:
        for suffix, extra in (
            ("models/model.json", "models/second.json"),
            ("data/sample_inputs/model.pt", "data/sample_inputs/second.pt"),
            ("data/weights/model_weights_config.json", "data/weights/second_weights_config.json"),
            (
                "data/constants/model_constants_config.json",
                "data/constants/second_constants_config.json",
            ),
        ):
            data = clean.read(f"digits/{suffix}")
            archive.writestr(f"digits/{extra}", evil_json(suffix, data))
    with pytest.raises(InvalidModelError, match=r"models/second\.json has an unsafe symbolic"):
        read_model(path)
    assert not marker.exists()
