"""TorchScript archives (``torch.jit.save``, scripted or traced).

The module is the ``ScriptModule`` itself; the engine recalibrates its scripted BN submodules. Its
pickled parts are read by TorchScript's own C++ unpickler, which only rebuilds tensors and
TorchScript classes: a tampered ``data.pkl`` fails to load instead of running code. torch.jit is
deprecated in torch 2.13 and warns so; those warnings are left for the user to see.

What the module's code may call is vetted against :mod:`worker.formats.op_allowlist` twice:

- before ``torch.jit.load``, in the archive's source (``code/**/*.py``): loading runs a scripted
  ``__setstate__``, so a denied operator (``torch.from_file``) or a foreign namespace
  (``ops.mylib.leak``) anywhere in the source refuses the file (:func:`check_torchscript_source`);
- after loading and before the first forward, in the compiled graphs
  (:func:`check_torchscript_graphs`): every method of every submodule and its hooks, with calls
  inlined and ``if``/loop blocks walked, so each node's kind (``aten::from_file``,
  ``prim::If``) is checked. This is the authoritative check; the source scan only guards load.
"""

from __future__ import annotations

import ast
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from recalib.errors import InvalidModelError
from worker.formats.op_allowlist import DENIED_OPS, allowlists_enabled, operator_problem

# Tensor methods that run a denied operator whatever the receiver (``loot.set_(storage)``).
_DENIED_METHODS = frozenset({"from_file", "set_"})


def load_torchscript(path: Path, *, check_ops: bool | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on CPU, in eval mode, with its operators vetted (module docstring).

    Args:
        path: the archive.
        check_ops: apply the operator allowlist; None: as
            :func:`~worker.formats.op_allowlist.model_allowlists` says (on by default).

    Raises:
        InvalidModelError: the archive is corrupt, tampered with or from an incompatible torch,
            or its code calls an operator the allowlist refuses (named in the message).
    """
    checking = allowlists_enabled(check_ops)
    if checking:
        check_torchscript_source(path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(
            f"{path.name}: cannot load this TorchScript archive (corrupt or tampered?): {first}",
            file=str(path),
        ) from exc
    if checking:
        check_torchscript_graphs(module, path)
    return module.eval()


def check_torchscript_source(path: Path) -> None:
    """Refuse an archive whose source names a denied operator or a foreign namespace.

    Raises:
        InvalidModelError: naming the member and the operator.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = [
                (info.filename, archive.read(info))
                for info in archive.infolist()
                if "/code/" in f"/{info.filename}" and info.filename.endswith(".py")
            ]
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InvalidModelError(
            f"{path.name}: corrupt zip archive ({exc})", file=str(path)
        ) from exc
    for member, data in members:
        try:
            tree = ast.parse(data.decode("utf-8"), filename=member)
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidModelError(
                f"{path.name}: {member} is not TorchScript source that can be vetted: {exc}",
                file=str(path),
            ) from exc
        for name in _called_operators(tree):
            problem = operator_problem(name)
            if problem:
                raise InvalidModelError(
                    f"{path.name}: {member} calls {name}, which {problem}; refusing to load it "
                    "(nothing ran)",
                    file=str(path),
                )


def _called_operators(tree: ast.AST) -> Iterator[str]:
    """Operators the source names: ``ops.ns.op``, denied ``torch.op`` and denied methods."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _dotted(node)
        if len(chain) >= 3 and chain[0] == "ops":
            yield f"{chain[1]}::{chain[2]}"
        elif node.attr in _DENIED_METHODS or (
            chain[:1] == ["torch"] and f"aten::{node.attr}" in DENIED_OPS
        ):
            yield f"aten::{node.attr}"


def _dotted(node: ast.Attribute) -> list[str]:
    """``ops.aten.add`` as ``["ops", "aten", "add"]``; ``[]`` unless the chain starts at a name."""
    parts: list[str] = []
    value: ast.expr = node
    while isinstance(value, ast.Attribute):
        parts.append(value.attr)
        value = value.value
    if not isinstance(value, ast.Name):
        return []
    parts.append(value.id)
    return parts[::-1]


def check_torchscript_graphs(module: torch.jit.ScriptModule, path: Path) -> None:
    """Refuse a module whose compiled code calls anything the allowlist does not allow.

    Every method of every submodule (and its forward hooks) is inlined and walked, blocks of
    ``prim::If``/``prim::Loop`` included. A ``prim::CallMethod`` left after inlining goes through
    a module interface, whose implementations are submodules checked here too.

    Raises:
        InvalidModelError: naming the operator (``aten::from_file``) and where it is called.
    """
    seen: set[tuple[str, str]] = set()
    for name, sub in module.named_modules():
        owner = f"submodule {name!r}" if name else "the model"
        for where, graph in _graphs(sub._c, owner, seen):
            torch._C._jit_pass_inline(graph)
            for node in _nodes(graph.block()):
                problem = _node_problem(node)
                if problem:
                    raise InvalidModelError(
                        f"{path.name}: {where} calls {node.kind()}, which {problem}; refusing "
                        "to run the model (nothing ran)",
                        file=str(path),
                    )


def _graphs(
    module: torch._C.ScriptModule, owner: str, seen: set[tuple[str, str]]
) -> Iterator[tuple[str, torch._C.Graph]]:
    """Copies of the graphs of a module's methods and hooks, once per TorchScript type."""
    for method in module._method_names():
        key = (module.qualified_name, method)
        if key not in seen:
            seen.add(key)
            yield f"method {method} of {owner}", module._get_method(method).graph.copy()
    hooks = (*module._get_forward_pre_hooks(), *module._get_forward_hooks())
    for hook in hooks:
        yield f"hook {hook.name} of {owner}", hook.graph.copy()


def _nodes(block: torch._C.Block) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _nodes(inner)


def _node_problem(node: torch._C.Node) -> str | None:
    if node.kind() == "prim::CallMethod":
        if isinstance(node.inputsAt(0).type(), torch.InterfaceType):
            return None
        return "is a method call that could not be inlined, so not vetted"
    return operator_problem(node.kind())


def save_torchscript(module: torch.jit.ScriptModule, out_path: Path) -> None:
    """``torch.jit.save`` with the module's current statistics."""
    torch.jit.save(module, str(out_path))
