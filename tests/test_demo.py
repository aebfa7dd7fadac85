"""`recalib demo`: the README's first command, end to end (serve, REST API, worker, shutdown)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker.digits import accuracy, make_digits_case


@pytest.mark.slow
def test_demo_recovers_accuracy_and_leaves_a_usable_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recalib.cli", "demo", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    numbers = {
        key: float(re.search(rf"{key}\s*: ([0-9.]+)", result.stdout).group(1))
        for key in ("original stats", "before recalibration", "after recalibration")
    }
    assert numbers["original stats"] > 0.95
    assert numbers["before recalibration"] < 0.2
    assert numbers["after recalibration"] > 0.8
    checkpoint = Path(re.search(r"recalibrated checkpoint: (\S+)", result.stdout).group(1))
    program = torch.export.load(checkpoint)
    case = make_digits_case()
    x, y = case.shifted_evaluation
    assert accuracy(program.module(), x, y) == pytest.approx(
        numbers["after recalibration"], abs=0.01
    )
    # serve was stopped: no process of this demo's data directory is left
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps
