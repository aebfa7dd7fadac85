"""The warm runner: one long-lived process per worker that runs its jobs one after another.

Started by the worker (:class:`worker.runner.supervise.RunnerProcess`) as a fresh interpreter
(``python -m worker.runner.warm``: spawned, never forked from a process that initialised torch
or CUDA), it imports torch and the pipeline once, initialises the worker's device once, says so
on its ready pipe (``--ready-fd``), then accepts one run at a time on the listening Unix socket
the worker handed it (``--fd``), from the work horse that RQ forked for the job
(:mod:`worker.runner.proxy`). Each run is the queue task's own :class:`~worker.runner.task._Run`:
the runner marks the record running and ends it, exactly as an in-process run would; here it
also has a :class:`~worker.runner.model_cache.ModelCache`.

It dies with its worker (``PR_SET_PDEATHSIG``), and exits as soon as the horse of the running
job goes away (killed by a cancel's stop-job, the job timeout or a cold shutdown), so that no
run ever continues unsupervised. After each job it releases what it can: Python garbage, the
CUDA caching allocator's free blocks, glibc's free heap. Ctrl-C in a terminal does not reach it
(a process group of its own); the worker stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

HORSE_CLOSE_WAIT_S = 5.0


class _HorseWatch(threading.Thread):
    """Exits the runner when the horse's connection closes before the run ended."""

    def __init__(self, sock: socket.socket, job_id: str) -> None:
        super().__init__(name="horse-watch", daemon=True)
        self.sock, self.job_id = sock, job_id
        self.run_ended = threading.Event()

    def run(self) -> None:
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        if not self.run_ended.is_set():
            from worker.runner.protocol import HORSE_GONE_EXIT

            logger.warning("job %s: its work horse went away; abandoning the run", self.job_id)
            os._exit(HORSE_GONE_EXIT)


class WarmRunner:
    """The runner's state: Redis connection, device, model cache, jobs run."""

    def __init__(self, worker_name: str) -> None:
        import redis
        import torch

        import worker.pipeline  # noqa: F401  (paid once here, not by the first job)
        from recalib.jobs.connection import redis_url
        from recalib.settings import get_settings
        from worker.runner.model_cache import ModelCache
        from worker.runner.task import data_workers

        self.settings = get_settings()
        self.worker_name = worker_name
        self.conn = redis.Redis.from_url(redis_url(self.settings))
        self.cache = ModelCache(self.settings.model_cache_bytes)
        self.data_workers = data_workers(self.settings)
        self.device = self.settings.worker_device
        self.jobs = 0
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.init()
            torch.empty(1, device=self.device)  # the context, once, not per job
        _warm_up(self.device)
        # Everything loaded so far lives as long as the runner: keep it out of the collector's
        # passes (the collection after each job then takes ~0.08 s instead of ~0.3 s here).
        gc.freeze()
        logger.info(
            "runner %d ready on %s (model cache %d bytes, %d data workers)",
            os.getpid(),
            self.device,
            self.settings.model_cache_bytes,
            self.data_workers,
        )

    def serve(self, listener: socket.socket) -> None:
        """Accept and run one request at a time, forever."""
        from worker.runner.protocol import decode_request, read_line

        while True:
            client, _ = listener.accept()
            with client:
                request = decode_request(read_line(client))
                if request is None:
                    logger.warning("runner: a connection without a valid request; ignored")
                    continue
                watch = _HorseWatch(client, request.job_id)
                watch.start()
                reply = self._run(request)
                watch.run_ended.set()
                self._answer(client, reply, watch)
            self._release_memory()  # while the worker does its bookkeeping
            self.cache.prepare_spare()  # the next job on this model need not copy it

    def _run(self, request: Any) -> dict[str, Any]:
        from worker.runner.task import _Run, _start

        try:
            record = _start(
                self.conn, self.settings, request.job_id, request.rq_job_id, request.worker
            )
            if record is not None:
                self.jobs += 1
                run = _Run(
                    self.conn,
                    self.settings,
                    record,
                    model_cache=self.cache,
                    data_workers=self.data_workers,
                )
                run.execute()
        except Exception as exc:  # the run's own errors end its record; this is Redis etc.
            logger.exception("job %s: the runner could not run it", request.job_id)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        return {"ok": True}

    def _answer(self, client: socket.socket, reply: dict[str, Any], watch: _HorseWatch) -> None:
        from worker.runner.protocol import send_line

        try:
            send_line(client, reply)
        except OSError as exc:
            logger.warning("runner: the horse left before the answer: %s", exc)
        watch.join(HORSE_CLOSE_WAIT_S)
        if watch.is_alive():
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)  # wakes the watch's recv
            watch.join(HORSE_CLOSE_WAIT_S)

    def _release_memory(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).malloc_trim(0)


WARM_IMPORTS = (
    "torch._export.serde.serialize",  # torch.export.load imports these on first use (~1.5 s)
    "torch.export.pt2_archive._package",
    "safetensors.torch",
)


def _warm_up(device: str) -> None:
    """Pay first-use costs here, before any job: lazy imports, a train-mode BN forward."""
    import importlib

    import torch

    for name in WARM_IMPORTS:
        with contextlib.suppress(ImportError):  # private modules: may move between versions
            importlib.import_module(name)
    target = device if device not in ("", "auto") else "cpu"
    with contextlib.suppress(Exception), torch.no_grad():
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(target)
        model(torch.zeros(2, 3, 8, 8, device=target))
        model.eval()(torch.zeros(2, 3, 8, 8, device=target))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="recalib's warm job runner (started by a worker)")
    parser.add_argument("--fd", type=int, required=True, help="listening Unix socket fd")
    parser.add_argument("--ready-fd", type=int, required=True, help="pipe: one byte when ready")
    parser.add_argument("--parent", type=int, required=True, help="the worker's pid")
    parser.add_argument("--worker", required=True, help="the worker's name")
    args = parser.parse_args(argv)

    from worker.runner.procs import die_with_parent

    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this process ends
    listener = socket.socket(fileno=args.fd)

    from recalib.settings import get_settings

    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    runner = WarmRunner(args.worker)
    os.write(args.ready_fd, b"1")
    os.close(args.ready_fd)
    runner.serve(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main())
