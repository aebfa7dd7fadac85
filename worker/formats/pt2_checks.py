"""Vetting a ``.pt2`` archive before ``torch.export.load`` touches it, and its graph before it runs.

``torch.export.load`` (torch 2.13) is not safe on untrusted files, whatever its JSON format
suggests. Verified code paths that run attacker-chosen code, each closed here:

- ``data/sample_inputs/*.pt`` (and legacy ``data/{weights,constants}/<model>.pt``) are loaded with
  ``weights_only=True`` *falling back to* ``weights_only=False``: we load them weights-only first.
- weights/constants marked ``use_pickle`` are ``torch.load(weights_only=False)``-ed and
  ``opaque_obj_`` constants ``pickle.loads``-ed: vetted weights-only / refused without opt-in.
- every ``expr_str`` of the program JSON goes through ``sympy.sympify``, i.e. ``eval``: each must
  be a plain ``srepr`` of symbols, numbers and known sympy/torch functions (:func:`check_expr`).
- ``guards_code`` strings become the body of a generated Python function run on every call:
  each must be a comparison of input sizes (:func:`check_guard`).
- ``data/aotinductor/`` holds compiled shared objects that get ``dlopen``-ed: refused.
- graph nodes may target any ``torch.*`` attribute (``torch.os.system`` resolves): after
  loading, every call target must be a torch operator (:func:`check_graph_targets`).
"""

from __future__ import annotations

import ast
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from recalib.errors import InvalidModelError, UnsafePickleError
from worker.formats.pickle_safety import OPT_IN_HINT, RISK, check_weights_only

_SYMPY_NAMES = frozenset(
    """Symbol Integer Rational Float Mul Add Pow Mod Max Min Abs floor ceiling sqrt Eq Ne Lt Le
    Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan And Or Not
    Piecewise ExprCondPair true false True False None oo zoo nan Infinity NegativeInfinity
    IntInfinity NegativeIntInfinity int_oo BooleanTrue BooleanFalse Half One Zero NegativeOne
    integer positive negative nonnegative nonpositive real finite infinite zero nonzero even odd
    rational commutative extended_real precision evaluate""".split()  # noqa: SIM905
)
_TORCH_SYMPY_PREFIXES = ("OpaqueUnaryFn_", "BitwiseFn_")
_EXPR_TOKEN = re.compile(
    r"\s+|'[A-Za-z0-9_.+\-]*'|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[A-Za-z_]\w*|\*\*|[-+*/%(),=<>!]"
)
_GUARD_NAMES = frozenset({"L", "math"} | {"Max", "Min", "Abs", "Mod", "FloorDiv", "CeilDiv"})
_GUARD_ATTRS = frozenset({"size", "stride", "storage_offset", "dim", "numel", "floor", "ceil"})
_GUARD_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.BinOp,
    ast.UnaryOp,
    ast.Constant,
    ast.Subscript,
    ast.Slice,
    ast.Name,
    ast.Attribute,
    ast.Call,
    ast.Load,
    ast.Tuple,
    ast.cmpop,
    ast.boolop,
    ast.operator,
    ast.unaryop,
)
_OPERATOR_NAMESPACES = frozenset({"aten", "prims", "quantized"})
_DENIED_OPS = frozenset({"aten::from_file"})  # reads (or with shared=True creates) any file


def _torch_sympy_names() -> frozenset[str]:
    import sympy
    import torch.utils._sympy.functions as functions

    return frozenset(
        name
        for name, value in vars(functions).items()
        if isinstance(value, type) and issubclass(value, sympy.Basic)
    )


def check_expr(expr: str) -> str | None:
    """Why ``expr`` (a serialized sympy expression) is unsafe to ``sympify``, or None if safe."""
    allowed = _SYMPY_NAMES | _torch_sympy_names()
    position = 0
    while position < len(expr):
        match = _EXPR_TOKEN.match(expr, position)
        if match is None:
            return f"unexpected character {expr[position]!r}"
        token = match.group()
        is_name = token[0].isalpha() or token[0] == "_"
        if is_name and token not in allowed and not token.startswith(_TORCH_SYMPY_PREFIXES):
            return f"unknown name {token!r}"
        position = match.end()
    return None


def check_guard(code: str) -> str | None:
    """Why a ``guards_code`` line is unsafe to execute, or None if it only compares sizes."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return "not a Python expression"
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            return f"{type(node).__name__} is not allowed"
        if isinstance(node, ast.Name) and node.id not in _GUARD_NAMES:
            return f"unknown name {node.id!r}"
        if isinstance(node, ast.Attribute) and node.attr not in _GUARD_ATTRS:
            return f"attribute {node.attr!r} is not allowed"
        if isinstance(node, ast.Call) and node.keywords:
            return "keyword arguments are not allowed"
    return None


def check_pt2_archive(
    path: Path, archive: zipfile.ZipFile, root: str, *, allow_unsafe_pickle: bool
) -> None:
    """Refuse a ``.pt2`` archive whose loading would run code (see the module docstring).

    Args:
        path: the file, for messages.
        archive: the open zip; ``root`` its single top-level folder.
        allow_unsafe_pickle: the operator's opt-in for pickled objects (opaque constants).

    Raises:
        InvalidModelError: a tampered or unsupported archive (names the member and problem).
        UnsafePickleError: a pickled member that only a full unpickle could load.
    """
    records = _records(path, archive, root)
    if any(name.startswith("data/aotinductor/") for name in records):
        raise InvalidModelError(
            f"{path.name}: AOTInductor packages hold compiled native code and are not "
            "supported; save the program with torch.export.save instead",
            file=str(path),
        )
    for name in records:
        if name.startswith("models/"):  # torch parses every member here as a program
            _check_program_json(path, name, archive.read(f"{root}/{name}"))
        elif name.startswith("data/sample_inputs/") or re.fullmatch(
            r"data/(weights|constants)/[^/]+\.pt", name
        ):
            check_weights_only(archive.read(f"{root}/{name}"), path=path, member=name)
    for name in records:
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            _check_payload_config(path, archive, root, name, allow_unsafe_pickle)


def _records(path: Path, archive: zipfile.ZipFile, root: str) -> set[str]:
    records = set()
    for info in archive.infolist():
        name = info.filename
        if not name.startswith(f"{root}/") or ".." in name.split("/"):
            raise InvalidModelError(
                f"{path.name}: member {name!r} lies outside the archive folder {root}/; "
                "not a file written by torch.export.save",
                file=str(path),
            )
        records.add(name[len(root) + 1 :])
    return records


def _check_program_json(path: Path, member: str, data: bytes) -> None:
    try:
        program = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidModelError(f"{path.name}: {member} is not valid JSON", file=str(path)) from exc
    for expr in _values_of(program, "expr_str"):
        problem = check_expr(expr) if isinstance(expr, str) else "not a string"
        if problem:
            raise _tampered(path, member, f"symbolic expression {str(expr)[:80]!r}: {problem}")
    guards = program.get("guards_code", []) if isinstance(program, dict) else []
    for guard in guards if isinstance(guards, list) else [guards]:
        problem = check_guard(guard) if isinstance(guard, str) else "not a string"
        if problem:
            raise _tampered(path, member, f"guard {str(guard)[:80]!r}: {problem}")


def _check_payload_config(
    path: Path, archive: zipfile.ZipFile, root: str, member: str, allow_unsafe_pickle: bool
) -> None:
    folder = member.rsplit("/", 1)[0]
    try:
        config = json.loads(archive.read(f"{root}/{member}"))["config"]
        entries = [
            (fqn, meta["path_name"], bool(meta.get("use_pickle"))) for fqn, meta in config.items()
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _tampered(path, member, "malformed payload config") from exc
    for fqn, file_name, use_pickle in entries:
        if not isinstance(file_name, str) or "/" in file_name or ".." in file_name:
            raise _tampered(path, member, f"bad payload path for {fqn}")
        if file_name.startswith("opaque_obj_") and not allow_unsafe_pickle:
            raise UnsafePickleError(
                f"{path.name}: constant {fqn} is a pickled Python object; {RISK}. {OPT_IN_HINT}",
                file=str(path),
            )
        if use_pickle and file_name.startswith(("weight_", "tensor_")):
            data = archive.read(f"{root}/{folder}/{file_name}")
            check_weights_only(data, path=path, member=f"{folder}/{file_name}")


def check_graph_targets(program: torch.export.ExportedProgram, path: Path) -> None:
    """Refuse a program whose graph calls anything but torch operators and arithmetic.

    Raises:
        InvalidModelError: naming the first offending call target.
    """
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_function" and not _is_allowed_target(node.target):
                raise InvalidModelError(
                    f"{path.name}: the program calls {_target_name(node.target)}, which is not "
                    "a torch operator; refusing to run it (tampered or unsupported program)",
                    file=str(path),
                )


def _is_allowed_target(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        name = (
            target.name()
            if isinstance(target, torch._ops.OpOverload)
            else target._qualified_op_name
        )
        namespace = name.split("::", 1)[0]
        return namespace in _OPERATOR_NAMESPACES and name.split(".")[0] not in _DENIED_OPS
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    module = getattr(target, "__module__", None)
    if module in ("_operator", "operator", "math"):
        return True
    return callable(target) and getattr(target, "__name__", "").lstrip("_").startswith("sym_")


def _target_name(target: Any) -> str:
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or str(target)
    return f"{module}.{name}" if module else name


def _values_of(tree: Any, key: str) -> Iterator[Any]:
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == key:
                    yield v
                else:
                    stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)


def _tampered(path: Path, member: str, problem: str) -> InvalidModelError:
    return InvalidModelError(
        f"{path.name}: {member} has an unsafe {problem}; refusing to load it (tampered file?)",
        file=str(path),
    )
