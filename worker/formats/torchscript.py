"""TorchScript archives (``torch.jit.save``, scripted or traced).

The module is the ``ScriptModule`` itself; the engine recalibrates its scripted BN submodules. Its
pickled parts are read by TorchScript's own C++ unpickler, which only rebuilds tensors and
TorchScript classes: a tampered ``data.pkl`` fails to load instead of running code. torch.jit is
deprecated in torch 2.13 and warns so; those warnings are left for the user to see.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recalib.errors import InvalidModelError


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on CPU, in eval mode.

    Raises:
        InvalidModelError: the archive is corrupt, tampered with or from an incompatible torch.
    """
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(
            f"{path.name}: cannot load this TorchScript archive (corrupt or tampered?): {first}",
            file=str(path),
        ) from exc
    return module.eval()


def save_torchscript(module: torch.jit.ScriptModule, out_path: Path) -> None:
    """``torch.jit.save`` with the module's current statistics."""
    torch.jit.save(module, str(out_path))
