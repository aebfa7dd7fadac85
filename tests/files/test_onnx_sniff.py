"""recalib.files.onnx_sniff: ONNX models recognized by content, without onnx, and nothing else."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from recalib.files.onnx_sniff import SNIFF_BYTES, looks_like_onnx


def test_real_onnx_models_are_recognized(tmp_path):
    onnx = pytest.importorskip("onnx")
    from tests.worker.onnx_models import GemmBN, gemm_bn_graph

    for opset in (9, 13, 18):
        data = gemm_bn_graph(GemmBN().eval(), opset).SerializeToString()
        assert looks_like_onnx(data[:SNIFF_BYTES])
    model = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    assert looks_like_onnx(model.SerializeToString())


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "head",
    [
        _zip(),
        b"\x80\x02}q\x00.",  # a pickle
        struct.pack("<Q", 8 + 256) + b'{"__metadata__": {}}',  # safetensors, header length 264
        b"# README\nsome text",
        b"\x7fELF\x02\x01\x01\x00" + bytes(100),
        b"\x08\x00",  # ir_version 0
        b"\x08\x07\x0f",  # field 1 then a tag of no ModelProto field
        b"\x12\x03abc",  # a ModelProto field, but not ir_version first
        b"",
    ],
)
def test_other_files_are_not_onnx(head):
    assert not looks_like_onnx(head)
