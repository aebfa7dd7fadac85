"""The job-option flags of ``recalib run`` and ``recalib submit``, generated from the contract.

Every field of :class:`~recalib.contract.JobOptions` becomes a flag (``batch_size`` →
``--batch-size``), and every field of its :class:`~recalib.contract.Preprocess` one of the "image
preprocessing" group (``center_crop`` → ``--center-crop``; list fields take comma-separated
values). Help texts, defaults and choices come from the field metadata, so both commands offer
exactly the contract's options and cannot drift from it or from each other. The descriptions
are written for the API's readers (field names in backticks, ``defaults.X``); :func:`help_text`
turns them into user text for the flags (flags for field names, values for defaults).

Values stay strings until :func:`options_from_args` hands them to pydantic, so a bad value gives
the same one-line error in both commands: ``--flag: message (got 'value')``, an
:class:`~recalib.errors.InvalidOptionError` (exit code 2). Options left out are left unset in the
returned :class:`JobOptions` (``model_fields_set``), so ``submit`` sends only what was given.
"""

from __future__ import annotations

import argparse
import enum
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from recalib import defaults
from recalib.contract import JobOptions, Preprocess
from recalib.errors import InvalidOptionError
from recalib.verdict import REQUIREMENTS

PREPROCESS_FIELD = "preprocess"
"""The JobOptions field holding :class:`Preprocess`: its fields get flags of their own."""
_PREPROCESS_DEST = "preprocess_"  # argparse dest prefix of the Preprocess flags

METAVARS = {
    "register": "NAME[@ALIAS]",
    "holdout": "FRACTION",
    "max_samples": "N",
    "prior_strength": "N|auto",
    "tolerance_window": "BATCHES",
    "input_names": "NAME,...",
    "resize": "PIXELS",
    "center_crop": "PIXELS",
}
"""Metavars where the last word of the field name would not say what the value is."""

MODEL_HELP = (
    "Model file: an exported program (.pt2), TorchScript (.pt, .ts), a state_dict "
    "(.safetensors, .pt) together with --arch, or an ONNX model (.onnx, BN kept); the "
    "recalibrated model is written in the same format."
)
CALIB_HELP = (
    "Calibration data from the target domain (labels optional): a tensor file (.npz, "
    ".safetensors or .pt) holding a float 'inputs' array (N×...) and optional 'labels', or an "
    "image archive (.zip, .tar, .tar.gz) of class folders (<class>/<image>), of flat images "
    "(unlabeled), or of images/ and masks/ folders (segmentation)."
)
EVAL_HELP = (
    "Labeled evaluation data, in the formats of --calib (left out: part of labeled calibration "
    "data is held out, see --holdout)."
)
SOURCE_EVAL_HELP = (
    "Labeled data from the model's training (source) domain, in the formats of --calib: without "
    "target labels, the label-free estimate of the target top-1 and its verdict come from it "
    "(docs/label_free.md)."
)
ARCH_HELP = (
    "MODULE:FUNCTION that builds the model, for a state_dict file (e.g. "
    "torchvision.models:resnet18), imported only from the modules of RECALIB_ARCH_ALLOWLIST "
    "(default: " + ", ".join(defaults.ARCH_ALLOWLIST) + ")."
)
"""Help of the data and model arguments that ``run`` and ``submit`` share."""


def add_require_flag(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--require better|not-worse``, the verdict gate of ``run`` and ``submit``
    (:func:`recalib.verdict.fails`); ``note`` is appended to the help."""
    parser.add_argument(
        "--require",
        choices=REQUIREMENTS,
        help=f"Exit 3 unless the verdict meets this{note}: 'better' fails on anything but "
        "better (unchanged, inconclusive, unknown too), 'not-worse' on worse.",
    )


def flag(name: str) -> str:
    """The command-line flag of a contract field: ``center_crop`` → ``--center-crop``."""
    return "--" + name.replace("_", "-")


def option_fields() -> dict[str, FieldInfo]:
    """The JobOptions fields that are flags (all but ``preprocess``), in contract order."""
    return {n: f for n, f in JobOptions.model_fields.items() if n != PREPROCESS_FIELD}


def preprocess_fields() -> dict[str, FieldInfo]:
    """The Preprocess fields, each a flag of the image preprocessing group."""
    return dict(Preprocess.model_fields)


def add_option_flags(parser: argparse.ArgumentParser, *, title: str = "job options") -> None:
    """Add one flag per JobOptions field and per Preprocess field to ``parser``."""
    engine = parser.add_argument_group(title)
    for name, field in option_fields().items():
        _add_flag(engine, name, name, field)
    images = parser.add_argument_group("image preprocessing (image archives)")
    for name, field in preprocess_fields().items():
        _add_flag(images, name, _PREPROCESS_DEST + name, field)


def options_from_args(args: argparse.Namespace) -> JobOptions:
    """The :class:`JobOptions` of the flags given (the others unset, at their defaults).

    Raises:
        InvalidOptionError: a value the contract refuses, naming its flag.
    """
    values: dict[str, Any] = {}
    for name, field in option_fields().items():
        value = getattr(args, name, None)
        if value is not None:
            is_list = _is_list(field.annotation)
            values[name] = [p.strip() for p in value.split(",")] if is_list else value
    preprocess: dict[str, Any] = {}
    for name, field in preprocess_fields().items():
        value = getattr(args, _PREPROCESS_DEST + name, None)
        if value is not None:
            is_list = _is_list(field.annotation)
            preprocess[name] = [p.strip() for p in value.split(",")] if is_list else value
    if preprocess:
        values[PREPROCESS_FIELD] = preprocess
    try:
        return JobOptions.model_validate(values)
    except ValidationError as exc:
        raise option_error(exc, given_preprocess=list(preprocess)) from None


def option_error(
    exc: ValidationError, *, given_preprocess: Sequence[str] = ()
) -> InvalidOptionError:
    """The first error of a JobOptions validation as ``--flag: message (got value)``; an error of
    the preprocessing flags together (channels of ``--mean`` vs ``--mode``) names those given."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    nested = loc[:1] == [PREPROCESS_FIELD]
    loc = loc[1:] if nested else loc
    if loc:
        where = flag(loc[0])
    elif nested:
        where = ", ".join(flag(name) for name in given_preprocess or preprocess_fields())
    else:
        where = "job options"
    value = f" (got {error['input']!r})" if loc and "input" in error else ""
    message = error["msg"].removeprefix("Value error, ")
    return InvalidOptionError(f"{where}: {message}{value}")


def _add_flag(group: argparse._ArgumentGroup, name: str, dest: str, field: FieldInfo) -> None:
    text = help_text(field).replace("%", "%%")  # argparse formats help with %
    if field.annotation is bool:  # given: True; left out: None (unset, the contract's default)
        group.add_argument(flag(name), dest=dest, action="store_true", default=None, help=text)
        return
    choices = _choices(field.annotation)
    if name in METAVARS:  # before choices: a number or a word (prior_strength: N|auto)
        metavar = METAVARS[name]
    elif choices:
        metavar = "{" + ",".join(choices) + "}"
    else:
        metavar = name.split("_")[-1].upper() + (",..." if _is_list(field.annotation) else "")
    group.add_argument(flag(name), dest=dest, metavar=metavar, help=text)


def help_text(field: FieldInfo) -> str:
    """The help of a field's flag: its description as user text, ending with its default.

    ``defaults.X`` becomes its value (or goes, where the value is already given before it); a
    field name in backticks becomes its flag (``tolerance_window`` → ``--tolerance-window``), as
    ``estimator=ema`` becomes ``--estimator ema``; a part of the value (``name`` of
    ``register``) its metavar word (``NAME``); other backticks go.
    The API description's note on how the flag is spelt goes too: the metavar shows it.
    """
    text = field.description or _doc_line(field.annotation) or ""
    text = re.sub(r",\s*`defaults\.(\w+)`", "", text)
    text = re.sub(r"`defaults\.(\w+)`", lambda m: _value_text(getattr(defaults, m[1])), text)
    text = re.sub(r"\s*Flag: [^.]*\.", "", text)
    text = re.sub(r"\b(\w+)=(\w+)", lambda m: _option_value(m[1], m[2]), text)
    parts = _part_names(field.annotation)
    text = re.sub(r"`([^`]*)`", lambda m: _plain(m[1], parts), text)
    default = field.default
    if default is not None and not isinstance(default, bool | BaseModel):
        text = f"{text.rstrip('.')}; default {_value_text(default)}."
    return text


def _plain(word: str, parts: set[str]) -> str:
    if word in JobOptions.model_fields or word in Preprocess.model_fields:
        return flag(word)
    return word.upper() if word in parts else word


def _option_value(name: str, value: str) -> str:
    """``estimator=ema`` → ``--estimator ema``; other ``a=b`` stay."""
    return f"{flag(name)} {value}" if name in JobOptions.model_fields else f"{name}={value}"


def _part_names(annotation: Any) -> set[str]:
    """The fields of a model-typed option (``register``: name, alias), named in its help."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return set(member.model_fields)
    return set()


def _value_text(value: Any) -> str:
    """A default as a user types it: ``inputs`` for ["inputs"], ``population`` for the enum."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list | tuple):
        return ",".join(_value_text(item) for item in value)
    return str(value)


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (``int | None`` → [int, NoneType]), else [annotation]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _choices(annotation: Any) -> list[str] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, enum.Enum):
            return [str(item.value) for item in member]
        if typing.get_origin(member) is Literal:
            return [str(value) for value in typing.get_args(member)]
    return None


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(member) is list for member in _members(annotation))


def _doc_line(annotation: Any) -> str | None:
    """The first docstring line of an enum annotation (``Estimator``), for fields without help."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, enum.Enum) and member.__doc__:
            return member.__doc__.strip().splitlines()[0]
    return None
