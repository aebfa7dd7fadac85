"""``.pt2`` programs (``torch.export.save``): load safely, expose real BN modules, save back.

An ExportedProgram has no BN modules to put in train mode: its graph calls
``aten.batch_norm.default(x, w, b, mean, var, False, momentum, eps, cudnn)`` (or, after
``run_decompositions``, ``aten._native_batch_norm_legit_no_training.default``). :func:`to_module`
unlifts the program into a plain ``torch.fx.GraphModule`` and rewrites each such call (an FX graph
pass) into a call of a real ``nn.BatchNorm1d/2d/3d`` that *shares* the program's weight, bias and
running buffers, named after the original module path (``"features.1"``). The engine then treats
it like any eager model. :func:`save_program` writes the module's current BN buffers back into the
program's state and saves a new ``.pt2``, which it reloads and runs once as a check.

A batch-norm call without running statistics (``track_running_stats=False``: ``training=True``
and no mean/var, or ``_native_batch_norm_legit.no_stats``) becomes a call of a BN module built the
same way, which computes the same thing: the engine then lists it as skipped, as it does for an
eager or TorchScript model. Other calls in training form are left as they are (logged).

A program's input shape may be fixed (exported without ``dynamic_shapes``) or bounded; its graph
then asserts it on every call. :func:`program_input` reads those sizes, so that the caller can feed
batches the program accepts and name a fixed dimension the data does not fit.
"""

from __future__ import annotations

import functools
import logging
import operator
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from recalib.errors import InternalError, InvalidModelError
from worker.formats.op_allowlist import allowlists_enabled
from worker.formats.pt2_checks import check_graph_targets, check_program_names, check_pt2_archive

logger = logging.getLogger(__name__)

_BN_ATTRS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_BN_BY_RANK: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


class AnyRankBatchNorm(_BatchNorm):
    """Batch norm over dim 1 for an input of unknown rank (no rank check)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return None


@dataclass(frozen=True)
class ProgramInput:
    """The sizes an exported program accepts for its first input.

    ``shape``: per dimension the fixed size, or None where the dimension is dynamic.
    ``batch_min``/``batch_max``: the sizes dimension 0 accepts (``batch_max`` None: no bound);
    equal when the batch size is fixed.
    """

    name: str
    shape: tuple[int | None, ...]
    batch_min: int
    batch_max: int | None

    def describe(self) -> str:
        """The shape with dynamic dimensions shown as ``*``: ``(5, 1, 8, 8)``, ``(*, 1, 8, 8)``."""
        return "(" + ", ".join("*" if size is None else str(size) for size in self.shape) + ")"


def program_input(program: torch.export.ExportedProgram) -> ProgramInput | None:
    """The shape constraints of the program's first user input; None if it is not a tensor."""
    names = program.graph_signature.user_inputs
    if not names:
        return None
    value = next(
        (
            n.meta.get("val")
            for n in program.graph.nodes
            if n.op == "placeholder" and n.name == names[0]
        ),
        None,
    )
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return None
    shape = tuple(size if isinstance(size, int) else None for size in value.shape)
    first = value.shape[0]
    if isinstance(first, int):
        return ProgramInput(names[0], shape, first, first)
    low, high = 1, None
    node = getattr(first, "node", None)
    bounds = program.range_constraints.get(node.expr) if node is not None else None
    if bounds is not None:
        if isinstance(bounds.lower, sympy.Integer):
            low = max(1, int(bounds.lower))
        if isinstance(bounds.upper, sympy.Integer):  # int_oo is not a sympy.Integer
            high = max(low, int(bounds.upper))
    return ProgramInput(names[0], shape, low, high)


def load_program(
    path: Path,
    archive: zipfile.ZipFile,
    root: str,
    *,
    allow_unsafe_pickle: bool,
    check_ops: bool | None = None,
) -> torch.export.ExportedProgram:
    """Vet and load a ``.pt2`` (see :mod:`worker.formats.pt2_checks`).

    Args:
        check_ops: apply the operator and name allowlists (:mod:`worker.formats.op_allowlist`)
            before anything turns the program into code; None: as
            :func:`~worker.formats.op_allowlist.model_allowlists` says (on by default).

    Raises:
        InvalidModelError / UnsafePickleError: a tampered, unsupported or unreadable archive, or
            a program calling an operator or using a name the allowlists refuse.
    """
    check_pt2_archive(path, archive, root, allow_unsafe_pickle=allow_unsafe_pickle)
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise InvalidModelError(
            f"{path.name}: torch.export.load failed: {str(exc).strip().splitlines()[0][:300]}",
            file=str(path),
        ) from exc
    if allowlists_enabled(check_ops):
        check_program_names(program, path)
        check_graph_targets(program, path)
    return program


def to_module(program: torch.export.ExportedProgram, path: Path) -> fx.GraphModule:
    """The program as an eval-mode GraphModule with real, shared BN submodules."""
    try:
        unlifted = program.module()
    except Exception as exc:
        raise InvalidModelError(
            f"{path.name}: cannot turn the exported program into a module: {exc}", file=str(path)
        ) from exc
    # A plain GraphModule: the unlifted one refuses train()/eval(), which the engine needs.
    module = fx.GraphModule(unlifted, unlifted.graph)
    rewrite_batchnorm(module)
    return module.eval()


def rewrite_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Replace inference batch-norm calls by calls of shared BN submodules; return their names."""
    names: list[str] = []
    for node in list(gm.graph.nodes):
        args = _bn_args(node)
        if args is None:
            continue
        x, weight, bias, mean, var, momentum, eps = args
        name = _install_bn(gm, node, weight, bias, mean, var, momentum, eps)
        if name is None:
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x,))
        value = node.meta.get("val")
        call.meta["val"] = value[0] if isinstance(value, tuple | list) else value
        if node.target is torch.ops.aten.batch_norm.default:
            node.replace_all_uses_with(call)
        else:  # the legit variant returns (out, save_mean, save_rstd): only out is used
            for user in list(node.users):
                user.replace_all_uses_with(call)
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        for attr in (weight, bias, mean, var):
            if isinstance(attr, fx.Node) and not attr.users:
                gm.graph.erase_node(attr)
        names.append(name)
    gm.graph.lint()
    gm.recompile()
    return names


def _bn_args(node: fx.Node) -> tuple[Any, ...] | None:
    """(x, weight, bias, mean, var, momentum, eps) of an inference BN call, else None.

    A call without running statistics (``track_running_stats=False``) has mean and var None.
    """
    if node.op != "call_function":
        return None
    args = list(node.args)
    if node.target is torch.ops.aten.batch_norm.default and len(args) >= 9:
        x, weight, bias, mean, var, training, momentum, eps, _ = args[:9]
    elif node.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
        if len(args) < 7 or not _uses_output_only(node):
            return None
        x, weight, bias, mean, var, momentum, eps = args[:7]
        training = False
    elif node.target is torch.ops.aten._native_batch_norm_legit.no_stats:
        if len(args) < 6 or not _uses_output_only(node):
            return None
        x, weight, bias, training, momentum, eps = args[:6]
        mean = var = None
    else:
        return None
    stats_free = training is True and mean is None and var is None  # track_running_stats=False
    if training is not False and not stats_free:
        logger.info("batch_norm %s runs in training form; left as it is", node.name)
        return None
    if not stats_free and not all(
        isinstance(t, fx.Node) and t.op == "get_attr" for t in (mean, var)
    ):
        logger.info("batch_norm %s has no running statistics; left as it is", node.name)
        return None
    if (weight is None) != (bias is None):
        return None
    attrs = (weight, bias)
    if stats_free and not all(t is None or getattr(t, "op", None) == "get_attr" for t in attrs):
        return None
    return x, weight, bias, mean, var, momentum, eps


def _uses_output_only(node: fx.Node) -> bool:
    """The legit variants return (out, save_mean, save_rstd); true if only out is read."""
    return all(user.target is operator.getitem and user.args[1] == 0 for user in node.users)


def _install_bn(
    gm: fx.GraphModule,
    node: fx.Node,
    weight: fx.Node | None,
    bias: fx.Node | None,
    mean: fx.Node | None,
    var: fx.Node | None,
    momentum: float,
    eps: float,
) -> str | None:
    """Create (or reuse) the BN submodule for one call; return its qualified name."""
    if mean is None:
        return _install_stats_free_bn(gm, node, weight, bias, momentum, eps)
    mean_target = str(mean.target)
    owner, _, attr = mean_target.rpartition(".")
    running_mean = fetch_attr(gm, mean_target)
    existing = _get_module(gm, owner) if owner else None
    if isinstance(existing, _BatchNorm) and existing.running_mean is running_mean:
        return owner  # the same BN module called twice
    expected = {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}
    in_place = (
        attr == "running_mean"
        and existing is not None
        and not existing._modules
        and set(existing._parameters) | set(existing._buffers) <= _BN_ATTRS
        and all(n is None or n.target == f"{owner}.{key}" for key, n in expected.items())
    )
    rank = getattr(node.args[0].meta.get("val"), "ndim", None)  # type: ignore[union-attr]
    bn_type = _BN_BY_RANK.get(rank, AnyRankBatchNorm) if isinstance(rank, int) else AnyRankBatchNorm
    bn = bn_type(
        running_mean.numel(), eps=float(eps), momentum=float(momentum), affine=weight is not None
    )
    bn.to(device=running_mean.device)
    if weight is not None and bias is not None:
        bn.weight = _as_parameter(fetch_attr(gm, str(weight.target)))
        bn.bias = _as_parameter(fetch_attr(gm, str(bias.target)))
    bn.running_mean = running_mean
    bn.running_var = fetch_attr(gm, str(var.target))
    tracked = getattr(existing, "num_batches_tracked", None) if in_place else None
    if isinstance(tracked, torch.Tensor):
        bn.num_batches_tracked = tracked
    name = owner if in_place else _unique_name(gm, f"{owner or 'bn'}_bn".replace(".", "_"))
    parent, _, leaf = name.rpartition(".")
    setattr(_get_module(gm, parent) if parent else gm, leaf, bn)
    return name


def _install_stats_free_bn(
    gm: fx.GraphModule,
    node: fx.Node,
    weight: fx.Node | None,
    bias: fx.Node | None,
    momentum: float | None,
    eps: float,
) -> str:
    """Create (or reuse) a ``track_running_stats=False`` BN submodule for a call without
    running statistics; return its qualified name, the original module's where it is free."""
    affine = weight is not None and bias is not None
    targets = [str(n.target) for n in (weight, bias) if n is not None] if affine else []
    params = [fetch_attr(gm, target) for target in targets]
    path = targets[0].rpartition(".")[0] if affine else _module_path(node)
    existing = _get_module(gm, path) if path else None
    if (
        isinstance(existing, _BatchNorm)
        and existing.running_mean is None
        and (not affine or existing.weight is params[0])
    ):
        return path  # the same BN module called twice
    value = node.args[0].meta.get("val")  # type: ignore[union-attr]
    rank = getattr(value, "ndim", None)
    bn_type = _BN_BY_RANK.get(rank, AnyRankBatchNorm) if isinstance(rank, int) else AnyRankBatchNorm
    bn = bn_type(
        params[0].numel() if affine else _channels(value),
        eps=float(eps),
        momentum=None if momentum is None else float(momentum),
        affine=affine,
        track_running_stats=False,
    )
    if affine:
        bn.weight, bn.bias = (_as_parameter(p) for p in params)
    parent, _, leaf = path.rpartition(".")
    parent_module = _get_module(gm, parent) if parent else gm
    if parent_module is None:  # "layers" holds no parameters, so the program has no module
        parent_module = _make_modules(gm, parent)
    holds_only_params = (
        existing is not None
        and not existing._modules
        and not existing._buffers
        and set(existing._parameters) == ({"weight", "bias"} if affine else set())
    )
    free = bool(leaf) and (
        holds_only_params or (parent_module is not None and not hasattr(parent_module, leaf))
    )
    name = path if free else _unique_name(gm, f"{path or 'bn'}_bn".replace(".", "_"))
    owner, _, attr = name.rpartition(".")
    setattr(_get_module(gm, owner) if owner else gm, attr, bn)
    return name


def _make_modules(gm: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``, adding empty modules where there are none (None: not a module)."""
    module = gm
    for part in path.split("."):
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        child = getattr(module, part)
        if not isinstance(child, nn.Module):
            return None
        module = child
    return module


def _module_path(node: fx.Node) -> str:
    """The path of the module that made a call (``"layers.1"``), or ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("", None))[0] if stack else ""
    return str(path).split("@", 1)[0]


def _channels(value: Any) -> int:
    size = value.shape[1] if isinstance(value, torch.Tensor) and value.ndim > 1 else 0
    return size if isinstance(size, int) else 0


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    if isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor, requires_grad=False)  # shares the storage


def _unique_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _get_module(gm: nn.Module, name: str) -> nn.Module | None:
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


def fetch_attr(module: nn.Module, target: str) -> Any:
    """The attribute at a dotted path (``"features.1.running_mean"``)."""
    return functools.reduce(getattr, target.split("."), module)


def save_program(program: torch.export.ExportedProgram, module: nn.Module, out_path: Path) -> None:
    """Write ``module``'s current buffers into ``program`` and ``torch.export.save`` it.

    Parameters are not written back: recalibration never changes them. The saved file is
    reloaded, its buffers compared and, when the program kept its sample inputs, run once.

    Raises:
        InternalError: the saved program does not hold the new statistics or does not run.
    """
    written: dict[str, torch.Tensor] = {}
    for name in program.graph_signature.buffers:
        try:
            value = fetch_attr(module, name)
        except AttributeError:
            continue  # unused by the graph, so unchanged
        table = program.state_dict if name in program.state_dict else program.constants
        if isinstance(value, torch.Tensor) and name in table:
            table[name] = written[name] = value.detach().to("cpu").clone()
    torch.export.save(program, out_path)
    reloaded = torch.export.load(out_path)
    for name, value in written.items():
        saved = reloaded.state_dict.get(name, reloaded.constants.get(name))
        if not isinstance(saved, torch.Tensor) or not torch.equal(saved, value):
            raise InternalError(f"saving {out_path.name} lost the new value of buffer {name}")
    if reloaded.example_inputs is not None:
        args, kwargs = reloaded.example_inputs
        try:
            with torch.no_grad():
                reloaded.module()(*args, **kwargs)
        except Exception as exc:
            raise InternalError(f"the saved program {out_path.name} does not run: {exc}") from exc
