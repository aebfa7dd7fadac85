"""``recalib run`` and ``recalib submit`` offer a flag for every job option of the contract, and a
value given on either command line arrives unchanged in the JobOptions that command builds."""

from __future__ import annotations

import enum
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic.fields import FieldInfo

from recalib.contract import JobOptions, Preprocess
from recalib.contract.options import Register
from recalib.errors import EXIT_USER_ERROR

COMMANDS = ("run", "submit")
FIELDS = {
    **{(None, n): f for n, f in JobOptions.model_fields.items() if n != "preprocess"},
    **{("preprocess", n): f for n, f in Preprocess.model_fields.items()},
}
# Values the metadata cannot suggest (a pattern-constrained string); a new field of such a type
# fails test_every_field_has_an_example until it gets one here.
EXAMPLES: dict[str, tuple[str, object]] = {
    "device": ("cpu", "cpu"),
    "output_key": ("aux.0", "aux.0"),
    "input_names": ("image, depth", ["image", "depth"]),
    "export": ("onnx", ["onnx"]),
    "register": ("digits-cnn@champion", Register(name="digits-cnn", alias="champion")),
    "prior_strength": ("auto", "auto"),  # a number or the word auto
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _members(annotation: Any) -> list[Any]:
    """The non-None alternatives of a union (``int | None`` → [int]), else [annotation]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _bound(field: FieldInfo, name: str) -> float | None:
    return next((getattr(m, name) for m in field.metadata if hasattr(m, name)), None)


def example(name: str, field: FieldInfo) -> tuple[list[str], object]:
    """Command-line words for ``field`` and the value they must give: valid, not the default."""
    annotation, default = field.annotation, field.default
    if annotation is bool:
        return [_flag(name)], True
    if name in EXAMPLES:
        text, value = EXAMPLES[name]
        return [_flag(name), text], value
    (member,) = _members(annotation)
    if typing.get_origin(member) is Literal or (
        isinstance(member, type) and issubclass(member, enum.Enum)
    ):
        choices = [getattr(c, "value", c) for c in (typing.get_args(member) or list(member))]
        value = next(c for c in reversed(choices) if c != getattr(default, "value", default))
        return [_flag(name), str(value)], value
    if typing.get_origin(member) is list:
        return [_flag(name), "0.5, 0.25,0.125"], [0.5, 0.25, 0.125]
    ge, gt, le, lt = (_bound(field, b) for b in ("ge", "gt", "le", "lt"))
    low = ge if ge is not None else gt if gt is not None else 0
    if member is int:
        value = int(low) + (1 if gt is None else 2)
        assert le is None or value <= le
    elif member is float:
        high = le if le is not None else lt if lt is not None else low + 4
        value = low + (high - low) / 4
    else:
        pytest.fail(f"no example for {name} ({annotation}): add one to EXAMPLES")
    assert value != default
    return [_flag(name), str(value)], value


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """``recalib run --help`` and ``recalib submit --help`` as a user gets them."""
    return {
        command: subprocess.run(
            [sys.executable, "-m", "recalib.cli", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        for command in COMMANDS
    }


def _parse(command: str, words: list[str], tmp_path: Path):
    """The JobOptions ``recalib <command> <words>`` builds, by the command's own code path."""
    from recalib.cli import build_parser

    model, calib = tmp_path / "model.pt2", tmp_path / "calib.npz"
    model.touch()
    calib.touch()
    args = build_parser().parse_args([command, str(model), "--calib", str(calib), *words])
    if command == "run":
        from recalib.commands.run import build_spec

        return build_spec(args).options
    from recalib.commands.job_options import options_from_args  # what submit's main sends

    return options_from_args(args)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("parent", "name"), sorted(FIELDS, key=str))
def test_every_option_has_a_flag(helps, command, parent, name) -> None:
    assert f"{_flag(name)} " in helps[command] or f"{_flag(name)}\n" in helps[command]


@pytest.mark.parametrize(("parent", "name"), sorted(FIELDS, key=str))
def test_every_field_has_an_example(parent, name) -> None:
    words, _ = example(name, FIELDS[parent, name])
    assert words[0] == _flag(name)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("parent", "name"), sorted(FIELDS, key=str))
def test_values_round_trip_into_job_options(command, parent, name, tmp_path) -> None:
    words, expected = example(name, FIELDS[parent, name])
    options = _parse(command, words, tmp_path)
    if parent is None:
        assert getattr(options, name) == expected
        assert options.model_fields_set == {name}  # only what was given is sent
    else:
        assert getattr(options.preprocess, name) == expected
        assert options.model_fields_set == {"preprocess"}
        assert options.preprocess.model_fields_set == {name}


@pytest.mark.parametrize("command", COMMANDS)
def test_no_flags_leave_every_option_unset(command, tmp_path) -> None:
    options = _parse(command, [], tmp_path)
    assert options == JobOptions()
    assert options.model_fields_set == set()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
        (["--tolerance-window", "x"], "--tolerance-window: Input should be a valid integer"),
        (["--eval-batch-size", "-1"], "--eval-batch-size: Input should be greater than"),
        (["--estimator", "median"], "--estimator: Input should be 'population'"),
        (["--mean", "0.5,x"], "--mean: Input should be a valid number"),
        (["--mode", "L", "--std", "1,2"], "--mode, --std: std needs 1 or 1 values for mode L"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(command, words, message, tmp_path) -> None:
    """Before anything runs or is uploaded (submit's server here does not exist): exit 2."""
    (tmp_path / "m.pt2").touch()
    (tmp_path / "c.npz").touch()
    cmd = [sys.executable, "-m", "recalib.cli", command, str(tmp_path / "m.pt2")]
    cmd += ["--calib", str(tmp_path / "c.npz"), *words]
    cmd += ["--server", "http://127.0.0.1:9"] if command == "submit" else []
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"recalib: error: {message}"), result.stderr
