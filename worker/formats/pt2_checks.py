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
  loading, every call target must be on the operator allowlist (:func:`check_graph_targets`,
  :mod:`worker.formats.op_allowlist`).
- ``program.module()`` writes the program's names into Python source that it ``exec``-s and runs
  on every call: parameter, buffer, constant and submodule names go into ``getattr(self, "...")``
  unescaped, keyword argument names into the ``forward`` signature, dict input keys into the
  generated guard function. Before it is called, each must be a plain name
  (:func:`check_program_names`).
"""

from __future__ import annotations

import ast
import collections
import json
import math
import operator
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from recalib.errors import InvalidModelError, UnsafePickleError
from worker.formats import op_allowlist
from worker.formats.op_allowlist import CALL_PATH, IDENTIFIER, INPUT_KEY, MODULE_PATH
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
_OPERATOR_NAMES = """getitem add sub mul truediv floordiv mod pow neg pos abs invert eq ne lt le gt
ge and_ or_ xor not_ lshift rshift"""
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
# Python callables a program's graph calls: shape arithmetic and tuple indexing (the deserializer
# resolves "_operator.*", "math.*" and "torch.*" names; operator.call/attrgetter are not these).
_PYTHON_CALLS = frozenset(
    {getattr(operator, name) for name in _OPERATOR_NAMES.split()}
    | {value for name, value in vars(math).items() if callable(value) and name[0] != "_"}
    | {getattr(torch, name) for name in dir(torch) if name.startswith("sym_")}
)


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
    """Refuse a program whose graphs call anything but allowed operators and shape arithmetic.

    Checks the main graph and every subgraph (``cond`` branches, ``while_loop`` bodies, ...)
    against :mod:`worker.formats.op_allowlist`.

    Raises:
        InvalidModelError: naming the first offending call target and why.
    """
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            problem = _target_problem(node.target)
            if problem:
                raise InvalidModelError(
                    f"{path.name}: the program calls {problem}; refusing to run it (nothing ran)",
                    file=str(path),
                )


def _target_problem(target: Any) -> str | None:
    """What the call target is and why it is refused, or None if it is allowed."""
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        name = (
            target.name()
            if isinstance(target, torch._ops.OpOverload)
            else target._qualified_op_name
        )
        problem = op_allowlist.operator_problem(name)
        return f"{name}, which {problem}" if problem else None
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() in op_allowlist.HIGHER_ORDER_OPS:
            return None
        return f"the higher-order operator {target.name()}, which is not on the allowlist"
    try:
        if target in _PYTHON_CALLS:
            return None
    except TypeError:  # unhashable
        pass
    return (
        f"{_target_name(target)}, which is not a torch operator (tampered or unsupported program)"
    )


def check_program_names(program: torch.export.ExportedProgram, path: Path) -> None:
    """Refuse a program with a name that ``program.module()`` would write into code unescaped.

    Parameter, buffer, constant and submodule names (graph signature, state dict, constants,
    module call graph, ``nn_module_stack``, ``get_attr``/``call_module`` targets) must be dotted
    paths of letters, digits and ``_`` (``layers.0.bn``); graph node and argument names
    identifiers; dict input keys free of quotes, backslashes and control characters.

    Raises:
        InvalidModelError: naming the offending name (``repr``) and where it is.
    """
    for where, name, pattern in _program_names(program):
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise InvalidModelError(
                f"{path.name}: {where} {name!r} is not a plain name; program.module() would "
                "paste it into the code it runs, so the program is refused (nothing ran)",
                file=str(path),
            )


def _program_names(program: torch.export.ExportedProgram) -> Iterator[tuple[str, Any, re.Pattern]]:
    signature = program.graph_signature
    for spec in signature.input_specs:
        if spec.target is not None:
            yield f"{spec.kind.name.lower()} name", spec.target, MODULE_PATH
        if getattr(spec.arg, "name", None) is not None:
            yield "input name", spec.arg.name, IDENTIFIER
    for spec in signature.output_specs:
        if spec.target is not None:
            yield f"{spec.kind.name.lower()} target", spec.target, MODULE_PATH
    for name in (*program.state_dict, *program.constants):
        yield "state name", name, MODULE_PATH
    for entry in program.module_call_graph:
        yield "module path", entry.fqn, CALL_PATH
        for arg in getattr(entry.signature, "forward_arg_names", None) or ():
            yield "forward argument", arg, IDENTIFIER
    in_spec = program.call_spec.in_spec
    if in_spec is not None and in_spec.type is tuple and in_spec.num_children == 2:
        keywords = in_spec.child(1)  # (args, kwargs): their names become forward's parameters
        for key in keywords.context if keywords.type is dict else ():
            yield "keyword input", key, IDENTIFIER
    for key in _spec_keys(in_spec):
        yield "input key", key, INPUT_KEY
    if program.example_inputs is not None:
        for key_path, _ in torch.utils._pytree.tree_flatten_with_path(program.example_inputs)[0]:
            for key in key_path:
                if isinstance(key, torch.utils._pytree.MappingKey) and not isinstance(key.key, int):
                    yield "sample input key", key.key, INPUT_KEY
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield from _graph_names(module.graph)


def _graph_names(graph: torch.fx.Graph) -> Iterator[tuple[str, Any, re.Pattern]]:
    for node in graph.nodes:
        yield "graph node", node.name, IDENTIFIER
        if node.op in ("get_attr", "call_module"):
            yield f"{node.op} target", node.target, MODULE_PATH
        for key in node.kwargs:
            yield "keyword argument", key, IDENTIFIER
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            yield "module path", path, CALL_PATH


def _spec_keys(spec: Any) -> Iterator[Any]:
    """The keys of every dict in a pytree spec; int keys are rendered by repr, so skipped."""
    if spec is None:
        return
    if spec.type in (dict, collections.OrderedDict):
        keys = spec.context
    elif spec.type is collections.defaultdict:
        keys = spec.context[1]
    else:
        keys = []
    yield from (key for key in keys if not isinstance(key, int))
    for child in spec.children():
        yield from _spec_keys(child)


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
