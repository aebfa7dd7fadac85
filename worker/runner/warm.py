"""The runner: a clean, warm parent that forks one confined process per job.

Started by a worker (:class:`worker.runner.supervise.RunnerProcess`) or by ``recalib run`` as a
fresh interpreter (``python -m worker.runner.warm``: spawned, never forked from a process that
initialised torch or CUDA) with an environment holding no secret. At sandbox level ``strict`` it
first enters a network namespace of its own (before any thread exists). It then imports torch
and the pipeline once, pays their first-use costs on a model of its own, and never loads a user's
model nor touches CUDA: it stays single-threaded (one intra-op thread, so that no OpenMP pool
exists to be broken by ``fork``) and holds no connection to Redis or the store.

For each connection on its listening socket (one at a time) it reads a
:class:`~worker.runner.protocol.JobRequest`, forks the job's process
(:func:`worker.runner.job_process.run_confined`) and supervises it: it answers the process's
forbidden system calls (:class:`worker.sandbox.syscalls.Listener`), kills it as soon as the
trusted side's connection closes, and once it is gone sends ``exit`` with its end and its
attempts. ``--one-shot`` serves one job and exits (``recalib run`` and forking workers). It dies
with its worker (``PR_SET_PDEATHSIG``); Ctrl-C in a terminal does not reach it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from worker.runner.protocol import JobRequest, decode_request, read_line, send_line

logger = logging.getLogger(__name__)


class Runner:
    """The runner's state: its sandbox level and the jobs it ran."""

    def __init__(self, level: str, *, warm_up_jobs: bool = True) -> None:
        self.level = level
        self.jobs = 0
        self.network = "shared"
        if level == "strict":
            from worker.sandbox.namespaces import unshare_network

            self.network = unshare_network()  # before torch starts any thread
        import torch

        self.default_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # no OpenMP pool in the parent: jobs fork from it
        import worker.pipeline  # noqa: F401  (paid once here, not by every job)

        _warm_up(jobs=warm_up_jobs)  # a one-shot runner runs one job: its own would be waste
        if level != "off":
            from worker.sandbox.syscalls import SeccompError, prepare_job_filter

            with contextlib.suppress(SeccompError):  # then each job builds it, and fails there
                prepare_job_filter()
        gc.freeze()  # what is loaded now lives as long as the runner: out of the collector's way
        logger.info("runner %d ready (sandbox %s, network %s, %d threads per job)",
                    os.getpid(), level, self.network, self.default_threads)  # fmt: skip

    def serve(self, listener: socket.socket, *, one_shot: bool = False) -> None:
        """Accept and run one job at a time (forever, or once)."""
        self.listener = listener
        while True:
            client, _ = listener.accept()
            with client:
                request = decode_request(read_line(client))
                if request is None:
                    logger.warning("runner: a connection without a valid request; ignored")
                else:
                    self.jobs += 1
                    self.run(client, request)
            gc.collect()
            if one_shot:
                return

    def run(self, client: socket.socket, request: JobRequest) -> None:
        """Fork the job's process, supervise it until it is gone, send ``exit``."""
        if request.level != self.level:  # a runner never weakens or changes its level
            request = dataclasses.replace(request, level=self.level)
        if request.threads <= 0:
            request = dataclasses.replace(request, threads=self.default_threads)
        ours, theirs = socket.socketpair()
        runner_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the job's process: nothing of the runner's but its connection
            ours.close()
            self.listener.close()
            from worker.runner.job_process import run_confined
            from worker.runner.procs import die_with_parent

            die_with_parent(runner_pid)  # a job never outlives its supervisor

            run_confined(client, theirs, request)
        theirs.close()
        status, attempts = self._supervise(pid, client, ours)
        with contextlib.suppress(OSError):
            send_line(client, {"event": "exit", "status": status, "attempts": attempts})

    def _supervise(self, pid: int, client: socket.socket, side: socket.socket) -> tuple[str, Any]:
        from worker.runner.procs import describe_wait_status
        from worker.sandbox.syscalls import Listener

        listener: Listener | None = None
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(client, select.POLLRDHUP)
        poller.register(side, select.POLLIN)
        gone = False
        try:
            while not gone:
                for fd, events in poller.poll():
                    if fd == pidfd:
                        gone = True
                    elif fd == client.fileno() and events & (select.POLLRDHUP | select.POLLHUP):
                        logger.warning("job %d: its trusted side went away; killing it", pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                        poller.unregister(client)
                    elif fd == side.fileno():
                        poller.unregister(side)
                        with contextlib.suppress(OSError, ValueError):
                            _, fds, _, _ = socket.recv_fds(side, 16, 1)
                            if fds:
                                listener = Listener(fds[0])
                                poller.register(listener.fd, select.POLLIN)
                    elif listener is not None and fd == listener.fd:
                        if events & select.POLLIN:
                            listener.handle()
                        else:
                            poller.unregister(listener.fd)
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(pidfd)
            side.close()
            if listener is not None:
                listener.close()
        attempts = [a.describe() for a in listener.attempts] if listener is not None else []
        return describe_wait_status(status), attempts


WARM_IMPORTS = (
    "torch._export.serde.serialize",  # torch.export.load imports these on first use (~1.5 s)
    "torch.export.pt2_archive._package",
    "safetensors.torch",
)


def _warm_up(*, jobs: bool) -> None:
    """Pay first-use costs before any job, so that each forked job starts warm: lazy imports,
    then whole jobs of the runner's own (a ``.pt2`` and a TorchScript model of a small BN net on
    random data, in a temporary directory): loading, the passes, saving, ``report.html``. Measured
    on the 2,000-sample digits job: the job's ``load`` phase 0.33 s without it, as in a warm
    process with it. Nothing of a user's is involved; failures only cost the warm-up."""
    import importlib
    import tempfile

    for name in WARM_IMPORTS:
        with contextlib.suppress(ImportError):  # private modules: may move between versions
            importlib.import_module(name)
    if not jobs:
        return
    with tempfile.TemporaryDirectory(prefix="recalib-warm-up-") as tmp:
        try:
            _warm_up_jobs(Path(tmp))
        except Exception:
            logger.warning("runner warm-up job failed; jobs pay first-use costs", exc_info=True)


def _warm_up_jobs(tmp: Path) -> None:
    import numpy as np
    import torch

    from recalib.contract import JobSpec
    from worker.pipeline import run_job

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
    ).eval()  # fmt: skip
    example = torch.zeros(4, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp / "warm.pt2")
    torch.jit.save(torch.jit.script(model), str(tmp / "warm.pt"))
    rng = np.random.default_rng(0)
    data = rng.normal(size=(16, 1, 8, 8)).astype(np.float32)
    np.savez(tmp / "data.npz", inputs=data, labels=rng.integers(0, 3, size=16))
    for name in ("warm.pt2", "warm.pt"):
        out = tmp / f"out-{name}"
        run_job(JobSpec(model_path=str(tmp / name), calibration_path=str(tmp / "data.npz"),
                        eval_path=str(tmp / "data.npz"), out_dir=str(out)))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="recalib's job runner (started by a worker)")
    parser.add_argument("--fd", type=int, required=True, help="listening Unix socket fd")
    parser.add_argument("--ready-fd", type=int, required=True, help="pipe: one byte when ready")
    parser.add_argument("--parent", type=int, required=True, help="the starting process's pid")
    parser.add_argument("--sandbox", required=True, help="sandbox level (RECALIB_SANDBOX)")
    parser.add_argument("--one-shot", action="store_true", help="serve one job, then exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    from worker.runner.procs import die_with_parent

    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this process ends
    listener = socket.socket(fileno=args.fd)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    runner = Runner(args.sandbox, warm_up_jobs=not args.one_shot)
    os.write(args.ready_fd, b"1")
    os.close(args.ready_fd)
    runner.serve(listener, one_shot=args.one_shot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
