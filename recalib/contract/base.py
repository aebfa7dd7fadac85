"""Bases of the contract models: inputs refuse unknown fields and non-finite numbers.

:data:`JsonObject` is the type of free-form inputs (``arch_kwargs``): plain JSON only, with finite
numbers, at most ``MAX_ARCH_KWARGS_DEPTH`` levels deep and ``MAX_ARCH_KWARGS_BYTES`` serialized,
so that whatever is accepted can be stored and read back unchanged.
"""

from __future__ import annotations

import json
import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from recalib import defaults


class Input(BaseModel):
    """What a client sends: a misspelt field or a NaN/Infinity is a validation error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Output(BaseModel):
    """What recalib returns or stores: fields added later are ignored by older readers."""

    model_config = ConfigDict(extra="ignore")


def _check_json(value: object, where: str, depth: int) -> None:
    """Raise ValueError naming ``where`` unless ``value`` is plain, finite, shallow JSON."""
    if depth > defaults.MAX_ARCH_KWARGS_DEPTH:
        raise ValueError(f"{where}: nested deeper than {defaults.MAX_ARCH_KWARGS_DEPTH} levels")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a finite number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
            _check_json(item, f"{where}.{key}", depth + 1)
        return
    raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


def _json_object(value: dict[str, object]) -> dict[str, object]:
    for key, item in value.items():
        _check_json(item, key, 1)
    size = len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    if size > defaults.MAX_ARCH_KWARGS_BYTES:
        raise ValueError(
            f"{size} bytes as JSON; at most {defaults.MAX_ARCH_KWARGS_BYTES} are accepted"
        )
    return value


JsonObject = Annotated[dict[str, object], AfterValidator(_json_object)]
"""A JSON object of plain values with finite numbers, bounded in depth and size."""
