"""The job-option flags of ``recalib run`` and ``recalib submit``, generated from the contract.

Every field of :class:`~recalib.contract.JobOptions` becomes a flag (``batch_size`` →
``--batch-size``), and every field of its :class:`~recalib.contract.Preprocess` one of the "image
preprocessing" group (``center_crop`` → ``--center-crop``; list fields take comma-separated
values). Help texts, defaults and choices come from the field metadata, so both commands offer
exactly the contract's options and cannot drift from it or from each other.

Values stay strings until :func:`options_from_args` hands them to pydantic, so a bad value gives
the same one-line error in both commands: ``--flag: message (got 'value')``, an
:class:`~recalib.errors.InvalidOptionError` (exit code 2). Options left out are left unset in the
returned :class:`JobOptions` (``model_fields_set``), so ``submit`` sends only what was given.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from recalib.contract import JobOptions, Preprocess
from recalib.errors import InvalidOptionError

PREPROCESS_FIELD = "preprocess"
"""The JobOptions field holding :class:`Preprocess`: its fields get flags of their own."""
_PREPROCESS_DEST = "preprocess_"  # argparse dest prefix of the Preprocess flags


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
    help_text = _help(field)
    if field.annotation is bool:  # given: True; left out: None (unset, the contract's default)
        group.add_argument(flag(name), dest=dest, action="store_true", default=None, help=help_text)
        return
    choices = _choices(field.annotation)
    if choices:
        metavar = "{" + ",".join(choices) + "}"
    else:
        metavar = name.split("_")[-1].upper() + (",..." if _is_list(field.annotation) else "")
    group.add_argument(flag(name), dest=dest, metavar=metavar, help=help_text)


def _help(field: FieldInfo) -> str:
    text = field.description or _doc_line(field.annotation) or ""
    default = field.default
    if isinstance(default, enum.Enum):
        default = default.value
    if default is not None and not isinstance(default, bool | BaseModel):
        text = f"{text.rstrip('.')}; default {default}."
    return text.replace("%", "%%")  # argparse formats help with %


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
