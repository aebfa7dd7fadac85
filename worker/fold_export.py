"""Saving a BN-folded model (:mod:`worker.folding`) for deployment.

:func:`save_folded` writes a ``.pt2`` (``torch.export`` with a dynamic batch dimension, or a fixed
one when the model will not export otherwise), or, for TorchScript input, the frozen module as
TorchScript.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
            tensors) to trace export with; batch dimension 0 is exported as dynamic.
        out_dir: where to write.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = loaded.source_path.stem
    if isinstance(result.module, torch.jit.ScriptModule):
        out_path = out_dir / f"{stem}.folded{loaded.source_path.suffix or '.pt'}"
        torch.jit.save(result.module, str(out_path))
        return artifact(out_path, "torchscript")
    if isinstance(example_inputs, dict):
        kwargs = {name: _two_rows(value) for name, value in example_inputs.items()}
        program = _export(result.module, (), loaded.source_path, kwargs)
    else:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        args = tuple(_two_rows(a) for a in args)
        program = _export(result.module, args, loaded.source_path)
    out_path = out_dir / f"{stem}.folded.pt2"
    torch.export.save(program, out_path)
    return artifact(out_path, "pt2")


def _two_rows(x: Any) -> Any:
    """export specializes size-1 dimensions, so trace with a batch of at least 2."""
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == 1:
        return torch.cat([x, x]).to("cpu")
    return x.to("cpu") if isinstance(x, torch.Tensor) else x


def _export(
    module: nn.Module, args: tuple[Any, ...], path: Path, kwargs: dict[str, Any] | None = None
) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)

    def dim(a: Any) -> Any:
        return {0: batch} if isinstance(a, torch.Tensor) and a.ndim > 0 else None

    dims: Any = {k: dim(v) for k, v in kwargs.items()} if kwargs else tuple(dim(a) for a in args)
    try:
        return torch.export.export(module, args, kwargs=kwargs, dynamic_shapes=dims)
    except Exception as exc:  # a model that fixes its batch size: export it static
        logger.warning("dynamic-batch export failed (%s); exporting with a fixed batch", exc)
    try:
        return torch.export.export(module, args, kwargs=kwargs)
    except Exception as exc:
        raise InvalidModelError(
            f"{path.name}: the folded model cannot be exported with torch.export: "
            f"{first_line(exc)}",
            file=str(path),
        ) from exc
