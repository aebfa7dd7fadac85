"""``recalib drift`` as a user runs it: a real subprocess (the sandboxed one-shot runner) on the
digits files, clean and shifted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recalib.errors import EXIT_DRIFTED, EXIT_OK, EXIT_USER_ERROR


def _drift(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recalib.cli", "drift", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_drift_recommends_for_shifted_digits_only(digits_case, digits_files, tmp_path) -> None:
    clean = tmp_path / "clean.npz"
    np.savez(clean, inputs=digits_case.calibration[0])
    model = digits_files["model"]

    shifted = _drift(model, "--data", digits_files["calibration"], "--out", tmp_path / "s")
    assert shifted.returncode == EXIT_OK, shifted.stderr  # exit 0 either way without the flag
    assert "drift: RECALIBRATE" in shifted.stdout
    assert "threshold 0.05" in shifted.stdout
    assert "head.1" in shifted.stdout  # a most-moved layer, named
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["report.html", "report.json"]
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["kind"] == "drift" and report["checkpoint"] is None
    assert report["drift"]["recommend_recalibration"] is True
    assert report["sandbox"]["level"] in ("strict", "basic", "off")  # the trusted side's part

    gate = _drift(model, "--data", digits_files["calibration"], "--out", tmp_path / "g",
                  "--fail-if-drifted", "--json")  # fmt: skip
    assert gate.returncode == EXIT_DRIFTED, gate.stderr
    assert json.loads(gate.stdout)["drift"]["score"] > 1.0

    calm = _drift(model, "--data", clean, "--out", tmp_path / "c", "--fail-if-drifted", "--json")
    assert calm.returncode == EXIT_OK, calm.stderr
    drift = json.loads(calm.stdout)["drift"]
    assert drift["recommend_recalibration"] is False
    assert drift["score"] < drift["threshold"]


@pytest.mark.parametrize(
    ("extra", "flag"), [(["--fold"], "--fold"), (["--drift-threshold", "0"], "--drift-threshold")]
)
def test_options_a_drift_check_cannot_take_are_exit_2(digits_files, extra, flag) -> None:
    result = _drift(digits_files["model"], "--data", digits_files["calibration"], *extra)
    assert result.returncode == EXIT_USER_ERROR
    assert flag in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_data_file_names_it(digits_files, tmp_path: Path) -> None:
    result = _drift(digits_files["model"], "--data", tmp_path / "nope.npz")
    assert result.returncode == EXIT_USER_ERROR
    assert "nope.npz" in result.stderr
