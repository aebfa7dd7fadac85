"""Serving the API with uvicorn under the operator's limits (``RECALIB_HTTP_*`` settings).

:func:`uvicorn_options` is what ``recalib serve`` passes to ``uvicorn.run``; ``python -m
service.server`` is the same for a container (host, port and worker processes from
``UVICORN_HOST``/``UVICORN_PORT``/``UVICORN_WORKERS`` as with the ``uvicorn`` command, else
``RECALIB_HOST``/``RECALIB_PORT`` and one process). The limits inside the app
(body size, body idle timeout, header size) are :mod:`service.limits`'; these are uvicorn's own:

- ``timeout_keep_alive``: an idle keep-alive connection is closed after this;
- ``limit_concurrency``: past this many connections and tasks, uvicorn answers 503 at once;
- ``h11_max_incomplete_event_size``: the h11 parser stops reading a request head this large (the
  httptools parser has no such limit; the app's 431 applies either way).
"""

from __future__ import annotations

import os
from typing import Any

from recalib.settings import Settings, get_settings


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` from the settings."""
    return {
        "timeout_keep_alive": settings.http_keepalive_s,
        "limit_concurrency": settings.http_max_connections,
        "h11_max_incomplete_event_size": settings.http_max_header_bytes,
    }


def main() -> None:
    """Run the API (``create_app`` from the environment) like ``uvicorn --factory``."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=os.environ.get("UVICORN_HOST", settings.host),
        port=int(os.environ.get("UVICORN_PORT", settings.port)),
        workers=int(os.environ.get("UVICORN_WORKERS", "1")),
        log_level=settings.log_level.lower(),
        **uvicorn_options(settings),
    )


if __name__ == "__main__":
    main()
