"""Recognizing an ONNX model by its first bytes, without importing onnx (the API has no onnx).

An ONNX file is a serialized protobuf ``ModelProto``, which has no magic number: writers emit
fields in field-number order, so a model starts with ``ir_version`` (field 1, a varint), then
further ``ModelProto`` fields. :func:`looks_like_onnx` walks the first fields of the head and
accepts it when every one of them is a ``ModelProto`` field of the right wire type, the first is
a plausible ``ir_version`` and a ``graph`` or ``opset_import`` field, or the head's end, follows.
"""

from __future__ import annotations

SNIFF_BYTES = 4096
"""How much of a file :func:`looks_like_onnx` needs."""

_VARINT, _LEN = 0, 2
_MODEL_FIELDS = {1: _VARINT, 2: _LEN, 3: _LEN, 4: _LEN, 5: _VARINT, 6: _LEN, 7: _LEN, 8: _LEN,
                 14: _LEN, 20: _LEN, 25: _LEN}  # fmt: skip
_MAX_IR_VERSION = 64
_MAX_FIELDS = 32


def _varint(data: bytes, at: int) -> tuple[int, int] | None:
    """The varint at ``at`` and the offset after it; None if truncated or over 10 bytes."""
    value = shift = 0
    for offset in range(at, min(at + 10, len(data))):
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset + 1
        shift += 7
    return None


def looks_like_onnx(head: bytes) -> bool:
    """Whether ``head`` (a file's first :data:`SNIFF_BYTES` or fewer) starts an ONNX model."""
    at = fields = 0
    while at < len(head) and fields < _MAX_FIELDS:
        key = _varint(head, at)
        if key is None:
            return fields > 0
        tag, at = key
        number, wire = tag >> 3, tag & 7
        if _MODEL_FIELDS.get(number) != wire or (fields == 0 and number != 1):
            return False
        value = _varint(head, at)
        if value is None:
            return fields > 0
        amount, at = value
        if number == 1 and not 1 <= amount <= _MAX_IR_VERSION:
            return False
        if wire == _LEN:
            at += amount
        fields += 1
        if number in (7, 8):
            return True
    return fields > 0 and at >= len(head)
