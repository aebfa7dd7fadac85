"""state_dict files (``.safetensors``, ``.pt``) plus an allowlisted architecture.

The architecture is ``"module:callable"`` called with JSON-able ``arch_kwargs``; ``module`` must
lie under one of the operator's allowlisted prefixes, matched on dotted boundaries (``"timm"``
allows ``timm.models`` but not ``timmy``), and is imported only after that check.

Checkpoints are unwrapped: a dict holding the tensors under ``"state_dict"``,
``"model_state_dict"`` or ``"model"`` (nested up to three levels) yields that dict, and a
``"module."`` prefix on every key (``DataParallel``) is stripped when the model has none. A missing
``num_batches_tracked`` is tolerated (BN fills it in). The per-module version metadata that
``torch.save`` keeps with a state_dict (``state_dict._metadata``, which some architectures' own
``_load_from_state_dict`` checks) is passed on through unwrapping and the prefix strip.

The architecture is user code: any exception it raises while building the model or loading the
state_dict (its constructor, its ``_load_from_state_dict`` hooks) is the input's problem, an
:class:`InvalidModelError` naming the arch and the cause.

Saving writes the keys that were read (after unwrapping) in their original dtypes and the same
container; other entries of a wrapping checkpoint are not kept.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from recalib.errors import (
    ArchitectureNotAllowedError,
    InvalidModelError,
    InvalidOptionError,
    RecalibError,
)

logger = logging.getLogger(__name__)

Container = Literal["safetensors", "pt"]
_ARCH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_MAX_LISTED = 8


def resolve_arch(arch: str, allowlist: Sequence[str]) -> Callable[..., Any]:
    """The callable named by ``arch``, imported only when its module is allowlisted.

    Raises:
        InvalidOptionError: ``arch`` is malformed, cannot be imported or is not callable.
        ArchitectureNotAllowedError: the module lies outside ``allowlist``.
    """
    if not _ARCH.match(arch):
        raise InvalidOptionError(
            f"arch {arch!r} must be 'module:callable', e.g. 'torchvision.models:resnet18'",
            field="arch",
        )
    module_name, attr = arch.split(":")
    if not any(module_name == p or module_name.startswith(f"{p}.") for p in allowlist):
        raise ArchitectureNotAllowedError(
            f"arch {arch!r}: module {module_name} is not under the allowed prefixes "
            f"{list(allowlist)}; the operator can extend RECALIB_ARCH_ALLOWLIST",
            field="arch",
        )
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise InvalidOptionError(
            f"arch {arch!r}: cannot import {module_name} ({exc}); is it installed on the worker?",
            field="arch",
        ) from exc
    except AttributeError as exc:
        raise InvalidOptionError(
            f"arch {arch!r}: {module_name} has no {attr}", field="arch"
        ) from exc
    if not callable(target):
        raise InvalidOptionError(f"arch {arch!r} is not callable", field="arch")
    return target  # type: ignore[no-any-return]


def build_model(
    arch: str, arch_kwargs: Mapping[str, object], allowlist: Sequence[str]
) -> nn.Module:
    """Call the allowlisted ``arch`` with ``arch_kwargs``; the result must be an ``nn.Module``."""
    try:
        json.dumps(dict(arch_kwargs))
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError(
            f"arch_kwargs must be JSON values: {exc}", field="arch_kwargs"
        ) from exc
    factory = resolve_arch(arch, allowlist)
    with arch_code(arch, "failed to build the model"):
        try:
            model = factory(**arch_kwargs)
        except TypeError as exc:
            raise InvalidOptionError(
                f"arch {arch!r} rejected arch_kwargs: {exc}", field="arch_kwargs"
            ) from exc
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(
            f"arch {arch!r} returned {type(model).__name__}, not an nn.Module", field="arch"
        )
    return model


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors and the header metadata of a ``.safetensors`` file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidModelError(
            f"{path.name}: not a readable safetensors file (corrupt or truncated?): {exc}",
            file=str(path),
        ) from exc


def unwrap_checkpoint(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The flat ``name → tensor`` dict inside a loaded checkpoint (see module docstring)."""
    for _ in range(3):
        if (
            isinstance(obj, Mapping)
            and obj
            and all(isinstance(v, torch.Tensor) for v in obj.values())
        ):
            return with_metadata(
                {str(k): v for k, v in obj.items()}, getattr(obj, "_metadata", None)
            )
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj, Mapping) and k in obj), None)
        if key is None:
            break
        logger.info("%s: using the state_dict under %r", path.name, key)
        obj = obj[key]  # type: ignore[index]
    found = list(obj)[:_MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
    raise InvalidModelError(
        f"{path.name}: no state_dict found (a dict of tensors, possibly under one of "
        f"{list(_WRAPPER_KEYS)}); found {found}",
        file=str(path),
    )


def apply_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str
) -> dict[str, torch.Tensor]:
    """Load ``state`` into ``model`` strictly; return the state as applied (prefix stripped).

    Raises:
        InvalidModelError: naming missing and unexpected keys and shape mismatches, or the
            arch's own code refusing the state_dict.
    """
    with arch_code(arch, "failed to list its state_dict", file=path):
        expected = model.state_dict()
    if all(k.startswith("module.") for k in state) and not any(
        k.startswith("module.") for k in expected
    ):
        state = _strip_module_prefix(state)
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} {_listing(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise InvalidModelError(
            f"{path.name} does not fit arch {arch}: {'; '.join(problems)}", file=str(path)
        )
    hint = ""
    if getattr(state, "_metadata", None) is None:  # .safetensors never has it
        hint = (
            f" ({path.name} keeps no state_dict version metadata; if {arch} needs it, save the "
            "state_dict with torch.save as .pt)"
        )
    with arch_code(arch, "refused the state_dict", file=path, hint=hint):
        model.load_state_dict(state, strict=False)
    return state


@contextlib.contextmanager
def arch_code(
    arch: str, failed: str, *, file: Path | None = None, hint: str = ""
) -> Iterator[None]:
    """Run user-supplied arch code: an exception from it (other than recalib's own) becomes an
    :class:`InvalidModelError` ``"arch <arch> <failed>: <Type>: <message><hint>"``."""
    try:
        yield
    except RecalibError:
        raise
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
        raise InvalidModelError(
            f"arch {arch} {failed}: {type(exc).__name__}: {cause}{hint}",
            field="arch",
            file=None if file is None else str(file),
        ) from exc


def with_metadata(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None
) -> dict[str, torch.Tensor]:
    """``tensors`` as a state_dict carrying ``metadata`` (torch's ``_metadata``) when given."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict(tensors)
    if metadata is not None:
        state._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return state


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict of a ``DataParallel`` wrapper as the inner module's, metadata included."""
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        return stripped
    inner = {
        "" if key == "module" else key.removeprefix("module."): value
        for key, value in metadata.items()
        if key == "module" or key.startswith("module.")
    }
    return with_metadata(stripped, inner)


def save_state_dict(
    model: nn.Module,
    dtypes: Mapping[str, torch.dtype],
    container: Container,
    out_path: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model``'s current values of the keys of ``dtypes`` (in those dtypes, as read)."""
    current = model.state_dict()
    state = {
        k: current[k].detach().to("cpu", dtype).contiguous().clone() for k, dtype in dtypes.items()
    }
    if container == "safetensors":
        save_file(state, str(out_path), metadata=metadata)
    else:
        torch.save(state, out_path)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", … ({len(items)} in all)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"
