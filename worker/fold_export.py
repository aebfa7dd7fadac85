"""Saving a BN-folded model (:mod:`worker.folding`) for deployment.

:func:`save_folded` writes a ``.pt2`` (``torch.export`` with a dynamic batch dimension, or a fixed
one when the model will not export otherwise), or, for TorchScript input, the frozen module as
TorchScript. A ``.pt2`` input is re-exported with its own dynamic dimensions and their bounds
(:func:`program_dynamic_shapes`): its unlifted module asserts those ranges on every call, so a wider
range fails to export, and a dimension left out would be fixed to the example's size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sympy
import torch
from torch import nn
from torch.export import Dim

from recalib.contract import Artifact
from recalib.errors import InvalidModelError
from worker.folding import FoldResult, first_line
from worker.formats.models import LoadedModel, artifact

logger = logging.getLogger(__name__)


def save_folded(
    result: FoldResult,
    loaded: LoadedModel,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor],
    out_dir: Path,
) -> Artifact:
    """Save the folded model as ``<stem>.folded.pt2`` (TorchScript input: ``<stem>.folded<ext>``).

    Args:
        result: from :func:`~worker.folding.fold_batchnorm`.
        loaded: the model it came from (name and format).
        example_inputs: one batch (a tensor, a tuple of positional tensors or a dict of keyword
            tensors) to trace export with; batch dimension 0 is exported as dynamic, or, for a
            ``.pt2`` input, the dimensions its program has dynamic, within the same bounds.
        out_dir: where to write.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = loaded.source_path.stem
    if isinstance(result.module, torch.jit.ScriptModule):
        out_path = out_dir / f"{stem}.folded{loaded.source_path.suffix or '.pt'}"
        torch.jit.save(result.module, str(out_path))
        return artifact(out_path, "torchscript")
    program = _export_folded(result.module, loaded, example_inputs)
    out_path = out_dir / f"{stem}.folded.pt2"
    torch.export.save(program, out_path)
    return artifact(out_path, "pt2")


def program_dynamic_shapes(program: torch.export.ExportedProgram) -> tuple[Any, ...]:
    """The ``dynamic_shapes`` of ``program``'s user inputs, in order, to export it again.

    Per tensor input ``{dim: Dim}`` for each dynamic dimension (None where all are fixed): a
    symbol becomes a ``Dim`` of the program's range for it, shared by every dimension with that
    symbol; a linear one (``2*s0 + 1``) the same ``Dim`` derived; any other ``Dim.AUTO``.
    """
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    roots: dict[sympy.Symbol, Any] = {}

    def root(symbol: sympy.Symbol) -> Any:
        if symbol not in roots:
            bounds = program.range_constraints.get(symbol)
            low = bounds.lower if bounds is not None else None
            high = bounds.upper if bounds is not None else None
            roots[symbol] = Dim(
                str(symbol),
                min=int(low) if isinstance(low, sympy.Integer) else None,
                max=int(high) if isinstance(high, sympy.Integer) else None,  # not int_oo
            )
        return roots[symbol]

    def dim(size: torch.SymInt) -> Any:
        expr = sympy.expand(size.node.expr)
        if isinstance(expr, sympy.Symbol):
            return root(expr)
        if len(expr.free_symbols) != 1:
            return Dim.AUTO
        (symbol,) = expr.free_symbols
        scale, offset = expr.coeff(symbol), expr.subs(symbol, 0)
        if not (isinstance(scale, sympy.Integer) and isinstance(offset, sympy.Integer)):
            return Dim.AUTO
        if sympy.expand(expr - scale * symbol - offset) != 0 or scale < 1:
            return Dim.AUTO
        derived = root(symbol) if scale == 1 else int(scale) * root(symbol)
        return derived + int(offset) if offset else derived

    shapes: list[Any] = []
    for name in program.graph_signature.user_inputs:
        value = values.get(name)
        sizes: tuple[Any, ...] = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
        dims = {i: dim(size) for i, size in enumerate(sizes) if isinstance(size, torch.SymInt)}
        shapes.append(dims or None)
    return tuple(shapes)


def _export_folded(
    module: nn.Module,
    loaded: LoadedModel,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor],
) -> torch.export.ExportedProgram:
    path = loaded.source_path
    if isinstance(example_inputs, dict):
        kwargs = {name: _two_rows(value) for name, value in example_inputs.items()}
        return _export(module, (), path, _batch_dims(kwargs), kwargs)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    program_shapes = program_dynamic_shapes(loaded.program) if loaded.program is not None else None
    if program_shapes is not None and len(program_shapes) == len(args):
        args = tuple(
            _two_rows(a) if _batch_can_double(dims) else _on_cpu(a)
            for a, dims in zip(args, program_shapes, strict=True)
        )
        return _export(module, args, path, program_shapes)
    args = tuple(_two_rows(a) for a in args)
    return _export(module, args, path, _batch_dims(args))


def _batch_dims(inputs: tuple[Any, ...] | dict[str, Any]) -> Any:
    """Batch dimension 0 of every tensor input dynamic, as one shared ``Dim``."""
    batch = Dim("batch", min=1)

    def dim(a: Any) -> Any:
        return {0: batch} if isinstance(a, torch.Tensor) and a.ndim > 0 else None

    if isinstance(inputs, dict):
        return {k: dim(v) for k, v in inputs.items()}
    return tuple(dim(a) for a in inputs)


def _batch_can_double(dims: dict[int, Any] | None) -> bool:
    if not dims or 0 not in dims:
        return False
    high = getattr(dims[0], "max", None)
    return not isinstance(high, int) or high >= 2


def _two_rows(x: Any) -> Any:
    """export specializes size-1 dimensions, so trace with a batch of at least 2."""
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == 1:
        return torch.cat([x, x]).to("cpu")
    return _on_cpu(x)


def _on_cpu(x: Any) -> Any:
    return x.to("cpu") if isinstance(x, torch.Tensor) else x


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    dynamic_shapes: Any,
    kwargs: dict[str, Any] | None = None,
) -> torch.export.ExportedProgram:
    """Export with ``dynamic_shapes``; a model that fixes those sizes is exported static."""
    dynamic = dynamic_shapes.values() if isinstance(dynamic_shapes, dict) else dynamic_shapes
    if any(dims is not None for dims in dynamic):
        try:
            return torch.export.export(module, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
        except Exception as exc:
            logger.warning("dynamic-shape export failed (%s); exporting with fixed sizes", exc)
    try:
        return torch.export.export(module, args, kwargs=kwargs)
    except Exception as exc:
        raise InvalidModelError(
            f"{path.name}: the folded model cannot be exported with torch.export: "
            f"{first_line(exc)}",
            file=str(path),
        ) from exc
