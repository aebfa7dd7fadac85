"""``recalib run`` on a segmentation model, as a user runs it: the summary speaks of mean IoU,
``--fail-if-worse`` follows the mean-IoU verdict, bad ``--output-key``/``--input-names`` exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recalib.contract import Report, Verdict
from recalib.errors import EXIT_OK, EXIT_USER_ERROR, EXIT_WORSE
from tests.worker.seg_digits import export_segnet, make_masks, make_seg_case
from worker.digits import load_digits_arrays, split_indices


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recalib.cli", "run", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def seg_files(tmp_path_factory) -> dict[str, Path]:
    case = make_seg_case(seed=0)
    out = tmp_path_factory.mktemp("seg-cli")
    files = {"model": export_segnet(case.model, out / "segnet.pt2")}
    images, labels = load_digits_arrays()
    _, _, evaluation = split_indices(len(images))
    clean = (images[evaluation], make_masks(images[evaluation], labels[evaluation]))
    for name, (x, masks) in (
        ("calibration", case.calibration),
        ("evaluation", case.evaluation),
        ("clean", clean),
    ):
        files[name] = out / f"{name}.npz"
        np.savez(files[name], inputs=x, labels=masks)
    return files


@pytest.mark.slow
def test_summary_speaks_of_mean_iou(seg_files, tmp_path) -> None:
    out = tmp_path / "out"
    result = _run(
        seg_files["model"], "--calib", seg_files["calibration"],
        "--eval", seg_files["evaluation"], "--out", out, "--task", "auto", "--ignore-index", "255",
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    report = Report.model_validate_json((out / "report.json").read_text())
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["mean", "IoU", f"{report.before.mean_iou:.4f}",
                                f"{report.after.mean_iou:.4f}"]  # fmt: skip
    assert lines[2].startswith("pixel accuracy") and "top-1" not in result.stdout
    assert "task: segmentation (auto: the labels are masks" in result.stdout
    assert "logits at output['out']" in result.stdout
    assert f"verdict: {report.verdict.value} on 360 samples" in result.stdout
    assert "pixel predictions changed" in result.stdout


@pytest.mark.slow
def test_fail_if_worse_follows_the_mean_iou_verdict(seg_files, tmp_path) -> None:
    # Calibrated on the shifted domain, evaluated on the clean one.
    out = tmp_path / "out"
    result = _run(
        seg_files["model"], "--calib", seg_files["calibration"], "--eval", seg_files["clean"],
        "--out", out, "--fail-if-worse",
    )  # fmt: skip
    report = Report.model_validate_json((out / "report.json").read_text())
    worse = report.after.mean_iou < report.before.mean_iou - 1e-3
    assert (report.verdict is Verdict.worse) == worse
    assert result.returncode == (EXIT_WORSE if worse else EXIT_OK), result.stderr
    assert ("mean IoU is LOWER" in result.stdout) == worse


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--output-key", "seg"], r"output_key 'seg' does not exist .* \['out', 'aux'\]"),
        (["--input-names", "image,depth"], r"calibration\.npz has no 'image' array"),
        (["--task", "detection"], r"--task: .*'auto', 'classification', 'segmentation'"),
    ],
)
def test_bad_task_flags_exit_2_naming_them(seg_files, tmp_path, flags, message) -> None:
    import re

    result = _run(
        seg_files["model"], "--calib", seg_files["calibration"], "--out", tmp_path / "out", *flags
    )
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
