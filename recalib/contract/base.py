"""Bases of the contract models: inputs refuse unknown fields and non-finite numbers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Input(BaseModel):
    """What a client sends: a misspelt field or a NaN/Infinity is a validation error."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Output(BaseModel):
    """What recalib returns or stores: fields added later are ignored by older readers."""

    model_config = ConfigDict(extra="ignore")
