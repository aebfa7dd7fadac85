"""Which operators a tenant's model may call, and which names it may give its parts.

A model file is hostile code. Behind the OS sandbox, this is the second layer: before a ``.pt2``
program is turned into a module (:mod:`worker.formats.pt2_checks`) or a TorchScript module runs
its first forward (:mod:`worker.formats.torchscript`), every operator its graphs call is checked
here, and every name that ends up in generated Python source must be a plain name.

The operator allowlist is by namespace plus a deny list, not a generated list of operators:

- ``aten``, ``prims`` and ``quantized`` operators are allowed, except :data:`DENIED_OPS`.
  These namespaces hold torch's own kernels; a generated list of their ~1,700 operators would
  refuse a model the day a torch upgrade adds one, and would not be shorter to review than the
  handful that touch anything outside the tensors: ``aten::from_file`` (reads a file, or with
  ``shared=True`` creates one), ``aten::save`` (writes one; TorchScript's ``torch.save``) and
  ``aten::set``/``aten::set_`` (re-point a tensor at another storage). Operators that only read
  tensor metadata (``storage_offset``, ``_has_same_storage_numel``) stay allowed. The tests walk
  every registered ``aten`` schema so that a new operator with ``file``/``save``/``load`` in its
  name, or a ``str filename`` or ``Storage`` argument, fails them until it is reviewed here.
- TorchScript's own node kinds (``prim::If``, ``prim::GetAttr``, ...) are an explicit list
  (:data:`TORCHSCRIPT_PRIM_KINDS`), collected from scripted and traced models: control flow,
  containers, attribute access, type refinement. Not on it: Python calls (``prim::PythonOp``),
  RPC (``prim::rpc_*``), ``fork``/awaitables, fusion groups and profiling nodes.
- Higher-order operators of ``.pt2`` graphs are an explicit list (:data:`HIGHER_ORDER_OPS`):
  control flow (``cond``, ``while_loop``, ``map``, ``scan``), grad/autocast regions and
  subgraph calls, whose subgraphs are checked like the main graph. Not on it: those that run an
  operator or a callable given as an argument (``auto_functionalized``, ``with_effects``,
  ``invoke_leaf_function``, ...), compiled or native code (``inline_asm_elementwise``,
  ``triton_kernel_wrapper_*``, ``aoti_call_delegate``) and TorchBind calls.
- Every other namespace, custom operator libraries included, is refused. Of plain Python
  callables a ``.pt2`` graph may call only shape arithmetic and ``getitem``
  (:mod:`worker.formats.pt2_checks`): not ``operator.call``, ``attrgetter`` or ``methodcaller``.

The operator and name checks can be switched off for a block (:func:`model_allowlists`) or one
call (``check_ops=False``), so that the sandbox's own tests can show that the OS sandbox alone
holds. The archive checks of :mod:`worker.formats.pt2_checks` (pickles, expressions, guards)
stay on.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar

OPERATOR_NAMESPACES = frozenset({"aten", "prims", "quantized"})
"""Namespaces whose every operator is allowed, but :data:`DENIED_OPS`."""

DENIED_OPS: dict[str, str] = {
    "aten::from_file": "reads a file (or creates one with shared=True)",
    "aten::save": "writes a file",
    "aten::set": "makes a tensor view another storage",
    "aten::set_": "makes a tensor view another storage",
}
"""Operators refused whatever the overload, with why."""

HIGHER_ORDER_OPS = frozenset(
    {
        "cond",
        "while_loop",
        "while_loop_stack_output",
        "map_impl",
        "scan",
        "associative_scan",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
        "invoke_subgraph",
        "hints_wrapper",
    }
)
"""``torch.ops.higher_order`` operators a ``.pt2`` graph may call (its subgraphs are checked)."""

TORCHSCRIPT_PRIM_KINDS = frozenset(
    "prim::" + kind
    for kind in """Constant GetAttr SetAttr If Loop RaiseException Uninitialized ListConstruct
    ListUnpack TupleConstruct TupleUnpack TupleIndex TupleSlice DictConstruct DictIndex
    CreateObject NumToTensor ImplicitTensorToNum StringIndex unchecked_cast
    unchecked_unwrap_optional isinstance Enter Exit Print EnumName EnumValue ConstantChunk
    ModuleContainerIndex CallMethod device dtype layout data requires_grad grad name index
    is_cpu is_cuda is_mps is_meta is_xpu is_ipu is_maia is_mtia is_vulkan is_xla is_sparse
    is_sparse_csr is_quantized is_nested is_mkldnn itemsize nbytes shape abs min max tolist
    rangelist type id""".split()  # noqa: SIM905
)
"""TorchScript ``prim::`` node kinds allowed; ``prim::CallMethod`` only through an interface
(:mod:`worker.formats.torchscript` inlines every other call)."""

MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
"""A parameter, buffer, constant or submodule name: ``features.1.running_mean``, ``0.weight``."""

CALL_PATH = re.compile(r"(?:[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?(?:@\d+)?")
"""A module call's path in a program (``""`` is the root; ``bn@1`` is the second call of bn)."""

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""A graph node, argument or keyword name."""

INPUT_KEY = re.compile(r"[A-Za-z0-9_.\-/: ]+")
"""A key of a dict input: no quotes, backslashes or control characters."""

_ENABLED: ContextVar[bool] = ContextVar("recalib_model_allowlists", default=True)


@contextlib.contextmanager
def model_allowlists(enabled: bool) -> Iterator[None]:
    """Within the block (this thread or task), apply the operator and name allowlists or not.

    On by default. Off only to test that the OS sandbox alone contains a hostile model:

        >>> with model_allowlists(enabled=False):
        ...     loaded = read_model(path)  # refused by the sandbox, if at all
    """
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def allowlists_enabled(check_ops: bool | None = None) -> bool:
    """``check_ops`` when given, else whether :func:`model_allowlists` leaves the checks on."""
    return _ENABLED.get() if check_ops is None else check_ops


def operator_problem(qualified_name: str) -> str | None:
    """Why a model may not call the operator ``"ns::name"`` (any overload), or None if it may.

    The reason reads after the operator's name: ``"aten::from_file, which " + problem``.
    """
    name = qualified_name.split(".", 1)[0]
    namespace = name.split("::", 1)[0]
    if name in DENIED_OPS:
        return DENIED_OPS[name]
    if namespace in OPERATOR_NAMESPACES:
        return None
    if namespace == "prim":
        return None if name in TORCHSCRIPT_PRIM_KINDS else "is not an allowed TorchScript node"
    return f"is in the {namespace!r} namespace, not torch's own (a custom or unsupported operator)"
