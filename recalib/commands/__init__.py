"""One module per ``recalib`` subcommand: ``add_parser(parser)`` and ``main(args) -> int``.

Modules import their heavy dependencies (torch, uvicorn) inside ``main`` so that building the
parser stays fast and torch-free. A command whose part is not installed (the API image has no
worker, the worker image no API) says so in one line (:func:`require`).
"""

from __future__ import annotations

import importlib.util

from recalib.errors import InternalError

_PARTS = {
    "worker": (("worker", "torch"), "the worker part (torch)", "recalib[worker]"),
    "service": (("service", "fastapi", "uvicorn"), "the API part (FastAPI)", "recalib[api]"),
}


def require(part: str, command: str) -> None:
    """Raise a one-line error when ``part`` (``worker`` or ``service``) is not installed here."""
    modules, what, extra = _PARTS[part]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise InternalError(
            f"`recalib {command}` needs {what}, which this installation lacks "
            f"(no {', '.join(missing)}): install '{extra}' or use the image that has it"
        )
