"""`recalib demo`: the README's first command, end to end (serve, REST API, worker, shutdown)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.bn_oracle import assert_statistics_equal, digits_net, digits_oracle, one_sample
from worker.digits import accuracy, load_digits_arrays, split_indices


def _processes_of(data_dir: Path) -> list[str]:
    """Command lines of live processes started for ``data_dir``: ``RECALIB_DATA_DIR`` in their
    environment, or their working directory under it (Valkey, which rewrites its environ area)."""
    entry = f"RECALIB_DATA_DIR={data_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cwd = Path(os.readlink(proc / "cwd"))
            if entry in environ or cwd.is_relative_to(data_dir):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """The demo's stdout up to and including the first line containing ``marker``."""
    out = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    return "".join(out)


@pytest.mark.slow
def test_demo_numbers_match_the_oracle_serves_until_interrupted_and_stops_everything(
    tmp_path: Path,
) -> None:
    cmd = [
        sys.executable,
        "-m",
        "recalib.cli",
        "demo",
        "--data-dir",
        str(tmp_path),
        "--keep-running",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out = _read_until(proc, "stays up on", timeout_s=240)
        assert "stays up on" in out, out
        numbers = {
            key: float(re.search(rf"{key}\s*: ([0-9.]+)", out).group(1))
            for key in ("original stats", "before recalibration", "after recalibration")
        }
        # while it stays up, the API answers and knows the demo's job
        url = re.search(r"stays up on (http://\S+) ", out).group(1)
        jobs = httpx.get(f"{url}/v1/jobs", timeout=10).json()["items"]
        assert [job["status"] for job in jobs] == ["succeeded"]
        proc.send_signal(signal.SIGINT)  # the user's Ctrl-C
        assert proc.wait(timeout=60) == 0, out + proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The numbers depend on the model this machine trained; what they must equal does not: the
    # demo's own model on the same data, and an oracle whose BN statistics this test pooled.
    inputs = tmp_path / "inputs"
    source, oracle, statistics = digits_oracle(
        inputs / "digits.pt2", inputs / "target-calibration.npz", inputs / "target-evaluation.npz"
    )
    shifted = np.load(inputs / "target-evaluation.npz")
    target = (shifted["inputs"], shifted["labels"])
    printed = 0.0005 + one_sample(target[1])  # three decimals, and one borderline sample
    images, labels = load_digits_arrays()
    held_out = split_indices(len(images))[2]  # the demo's clean evaluation split
    clean = (images[held_out], labels[held_out])
    assert numbers["original stats"] == pytest.approx(accuracy(source, *clean), abs=printed)
    assert numbers["before recalibration"] == pytest.approx(accuracy(source, *target), abs=printed)
    assert numbers["after recalibration"] == pytest.approx(accuracy(oracle, *target), abs=printed)
    checkpoint = Path(re.search(r"recalibrated checkpoint: (\S+)", out).group(1))
    assert checkpoint.parent == tmp_path / "out"
    assert_statistics_equal(digits_net(checkpoint), statistics)
    after_top1 = accuracy(torch.export.load(checkpoint).module(), *target)
    assert after_top1 == pytest.approx(numbers["after recalibration"], abs=printed)
    assert Path(re.search(r"report: (\S+)", out).group(1)).is_file()
    # serve, its worker and Valkey were all stopped: no process of this demo is left
    assert _processes_of(tmp_path / "service") == []
