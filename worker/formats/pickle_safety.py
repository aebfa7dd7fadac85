"""Loading torch-pickled bytes without running code from them.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; anything else (a
whole ``nn.Module``, an ``os.system`` payload) makes it raise ``UnpicklingError`` before any
foreign callable runs. :func:`load_weights_only` turns that into :class:`UnsafePickleError` naming
the refused global and the opt-in; :func:`check_weights_only` vets bytes that another loader
(``torch.export.load``) would otherwise unpickle with ``weights_only=False``.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from recalib.errors import InvalidModelError, UnsafePickleError

OPT_IN_HINT = (
    "only if you trust its author, opt in with `--allow-unsafe-pickle` "
    "(service: RECALIB_ALLOW_UNSAFE_PICKLE=true)"
)
RISK = "unpickling it can run arbitrary code on this machine"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refused_global(exc: BaseException) -> str | None:
    """The ``module.name`` the weights-only unpickler refused, parsed from its message."""
    match = _GLOBAL.search(str(exc))
    return match.group(1) if match else None


def unsafe_pickle_error(path: Path | str, exc: BaseException, *, what: str) -> UnsafePickleError:
    """The error for a file that only a full (code-running) unpickle could load."""
    name = Path(path).name
    found = refused_global(exc)
    detail = f" (it references {found})" if found else ""
    return UnsafePickleError(
        f"{name}: {what} holds Python objects beyond tensors{detail}; {RISK}. "
        f"Save a state_dict (safetensors) or a torch.export .pt2 instead, or, {OPT_IN_HINT}",
        file=str(path),
    )


def load_weights_only(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with recalib's errors.

    Raises:
        UnsafePickleError: the file needs a full unpickle (a pickled module, a code payload).
        InvalidModelError: the file is not a readable torch.save file (corrupt, truncated).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise unsafe_pickle_error(path, exc, what="this torch.save file") from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
        raise InvalidModelError(
            f"{Path(path).name}: not a readable torch.save file (corrupt or truncated?): "
            f"{_first_line(exc)}",
            file=str(path),
        ) from exc


def check_weights_only(data: bytes, *, path: Path, member: str) -> None:
    """Check that ``data`` (a torch.save blob inside an archive) loads weights-only.

    Raises:
        UnsafePickleError: the blob needs a full unpickle.
        InvalidModelError: the blob is not a torch.save payload at all.
    """
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise unsafe_pickle_error(path, exc, what=f"the archive member {member}") from exc
    except Exception as exc:
        raise InvalidModelError(
            f"{path.name}: archive member {member} is not a readable torch.save payload: "
            f"{_first_line(exc)}",
            file=str(path),
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
