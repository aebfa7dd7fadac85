"""``recalib run`` as a user runs it: a real subprocess on the digits files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from recalib.contract import Report
from recalib.errors import EXIT_USER_ERROR, EXIT_WORSE
from tests.bn_oracle import assert_statistics_equal, digits_net, digits_oracle, one_sample
from tests.live import REPO_ROOT
from worker.digits import accuracy


def _run(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recalib.cli", "run", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_run_prints_a_summary_and_writes_outputs(digits_files, tmp_path) -> None:
    out = tmp_path / "out"
    result = _run(
        digits_files["model"],
        "--calib", digits_files["calibration"],
        "--eval", digits_files["evaluation"],
        "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = Report.model_validate_json((out / "report.json").read_text())
    # against references computed here, not absolute accuracies (they depend on the trained model)
    source, oracle, statistics = digits_oracle(
        digits_files["model"], digits_files["calibration"], digits_files["evaluation"]
    )
    target = np.load(digits_files["evaluation"])
    inputs, labels = target["inputs"], target["labels"]
    assert report.before.top1 == pytest.approx(
        accuracy(source, inputs, labels), abs=one_sample(labels)
    )
    assert report.after.top1 == pytest.approx(
        accuracy(oracle, inputs, labels), abs=one_sample(labels)
    )
    assert_statistics_equal(digits_net(out / report.checkpoint.file), statistics)
    assert "verdict: better" in result.stdout
    assert f"{report.after.top1:.4f}" in result.stdout
    assert str(out / report.checkpoint.file) in result.stdout
    # not a terminal: no progress bar in logs; past 10 s (a loaded machine) one line per phase
    assert all(
        re.fullmatch(r"recalib: (loading|evaluating|recalibrating|saving)( \(\d+ batches\))?", line)
        for line in result.stderr.splitlines()
    ), result.stderr


@pytest.mark.slow
def test_run_json_with_default_out_dir(digits_files, tmp_path) -> None:
    result = _run(
        digits_files["model"], "--calib", digits_files["calibration"], "--json",
        "--max-samples", "120", "--seed", "3",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = Report.model_validate(json.loads(result.stdout))
    assert report.options.max_samples == 120
    assert report.data.evaluated_on == "holdout"
    assert report.calibration.samples == 120
    written = tmp_path / "recalib-out" / "digits" / "report.json"
    assert Report.model_validate_json(written.read_text()) == report


@pytest.mark.slow
def test_fail_if_worse_exits_3(digits_case, digits_files, tmp_path) -> None:
    # Calibrating on the shifted domain and evaluating on the clean one makes the model worse.
    np.savez(
        tmp_path / "clean.npz", inputs=digits_case.evaluation[0], labels=digits_case.evaluation[1]
    )
    result = _run(
        digits_files["model"], "--calib", digits_files["calibration"],
        "--eval", tmp_path / "clean.npz", "--out", tmp_path / "out", "--fail-if-worse",
    )  # fmt: skip
    assert result.returncode == EXIT_WORSE, result.stderr
    assert "verdict: worse" in result.stdout
    assert "LOWER" in result.stdout


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--momentum", "abc"], "--momentum"),
        (["--estimator", "median"], "--estimator"),
        (["--device", "tpu"], "--device"),
        (["--autocast", "fp8"], "--autocast"),
        (["--resize", "-3"], "--resize"),
        (["--arch-kwargs", "[1, 2]"], "--arch-kwargs"),
        (["--arch-kwargs", '{"a": NaN}'], "--arch-kwargs"),  # JSON, but the contract refuses it
    ],
)
def test_bad_option_is_one_line_exit_2(digits_files, tmp_path, args, flag) -> None:
    result = _run(digits_files["model"], "--calib", digits_files["calibration"], *args)
    assert result.returncode == EXIT_USER_ERROR
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("recalib: error:")
    assert flag in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_exit_2_names_it(digits_files, tmp_path) -> None:
    missing = tmp_path / "absent.npz"
    result = _run(digits_files["model"], "--calib", missing)
    assert result.returncode == EXIT_USER_ERROR
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(missing) in result.stderr


@pytest.mark.slow
def test_user_error_inside_the_job_is_one_line(digits_case, digits_files, tmp_path) -> None:
    inputs, labels = digits_case.shifted_evaluation
    np.savez(tmp_path / "bad.npz", inputs=inputs, labels=labels + 10)
    result = _run(
        digits_files["model"], "--calib", digits_files["calibration"],
        "--eval", tmp_path / "bad.npz", "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == EXIT_USER_ERROR
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "label" in result.stderr
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("factory", "cause"),
    [
        ("versioned_net", "refused the state_dict: ValueError: version should be set to 1 or 2"),
        ("exploding_net", "failed to build the model: RuntimeError: this architecture needs"),
    ],
)
def test_arch_code_failing_is_invalid_model_exit_2(digits_files, tmp_path, factory, cause) -> None:
    """Like torchvision's mnasnet0_5 with a .safetensors state_dict (no version metadata)."""
    from tests.worker import refusing_archs

    model = tmp_path / "versioned.safetensors"
    save_file(dict(refusing_archs.versioned_net().state_dict()), str(model))
    arch = f"{refusing_archs.MODULE}:{factory}"
    result = subprocess.run(
        [sys.executable, "-m", "recalib.cli", "run", str(model), "--arch", arch,
         "--calib", str(digits_files["calibration"]), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
        env=os.environ | {"RECALIB_ARCH_ALLOWLIST": refusing_archs.MODULE},
    )  # fmt: skip
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"recalib: error: arch {arch} {cause}"), result.stderr
    assert "internal error" not in result.stderr
