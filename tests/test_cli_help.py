"""``recalib --help`` and the subcommands' help read as user text (issue 19): what recalib does,
plain option descriptions with their defaults as values, the data formats, where serve keeps its
data and how it finds Redis; and the demo says a job's progress without repeating itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from recalib import defaults
from recalib.contract import JobStatus, Phase

COMMANDS = ("run", "drift", "submit", "serve", "worker", "demo")


def _help(*argv: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "recalib.cli", *argv, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
    ).stdout


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {"": _help(), **{command: _help(command) for command in COMMANDS}}


def _flat(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_is_plain_user_text(helps, command) -> None:
    text = helps[command]
    assert "`" not in text
    assert "defaults." not in text
    assert "['" not in text and '["' not in text
    assert ":mod:" not in text and ":class:" not in text


def test_top_help_says_what_recalib_does_and_lists_the_subcommands(helps) -> None:
    text = _flat(helps[""])
    assert "dispatcher" not in text
    assert "BatchNorm" in text
    description = text.split("positional arguments")[0]
    for command in COMMANDS:
        assert command in description


def test_run_help_renders_defaults_as_values_and_meaningful_metavars(helps) -> None:
    text = _flat(helps["run"])
    assert "--register NAME[@ALIAS]" in text
    assert "REGISTER" not in text
    assert f"default {defaults.HOLDOUT}" in text  # --holdout
    assert "default inputs" in text  # --input-names, not a list repr
    options = text.split("job options", 1)[1]
    tolerance = options.split("--tolerance TOLERANCE ", 1)[1].split(" --tolerance-window BATCHES ")[
        0
    ]
    assert tolerance.endswith(" over --tolerance-window batches.")  # the flag, not the field


@pytest.mark.parametrize("command", ["run", "submit"])
def test_calib_help_lists_the_data_formats(helps, command) -> None:
    calib = _flat(helps[command]).split("--calib", 2)[2].split(" --eval")[0]
    for extension in (".npz", ".safetensors", ".pt", ".zip", ".tar", ".tar.gz"):
        assert extension in calib, calib
    assert "folder" in calib


def test_serve_help_names_the_data_dir_and_the_embedded_valkey(helps) -> None:
    text = _flat(helps["serve"])
    assert defaults.DATA_DIR in text
    assert "RECALIB_DATA_DIR" in text
    assert "Valkey" in text
    assert "RECALIB_REDIS_URL" in text


class _FakeClient:
    """What the demo's ``_submit`` calls of :class:`RecalibClient`, reporting a job's progress
    as the server does: queued while it waits, then each phase of the running job."""

    PROGRESS = [
        ("queued", "queued"),
        ("queued", "queued"),
        ("running", "loading"),
        ("running", "recalibrating"),
        ("running", "recalibrating"),
        ("running", "evaluating"),
        ("succeeded", "done"),
    ]

    def __init__(self, url: str) -> None:
        del url

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def upload_file(self, path: Path) -> SimpleNamespace:
        return SimpleNamespace(id=path.name)

    def create_job(self, *files: str, eval_file: str) -> SimpleNamespace:
        return self._job("queued", "queued")

    def wait(self, job_id: str, *, on_progress) -> SimpleNamespace:
        for status, phase in self.PROGRESS:
            on_progress(self._job(status, phase))
        return self._job("failed", "done")  # nothing to download

    @staticmethod
    def _job(status: str, phase: str) -> SimpleNamespace:
        return SimpleNamespace(
            id="job-1", status=JobStatus(status), progress=SimpleNamespace(phase=Phase(phase))
        )


def test_demo_says_each_status_and_phase_once(monkeypatch, tmp_path, capsys) -> None:
    from recalib.commands import demo

    monkeypatch.setattr("recalib.client.RecalibClient", _FakeClient)
    inputs = {name: tmp_path / f"{name}.npz" for name in ("model", "calibration", "evaluation")}
    demo._submit("http://127.0.0.1:1", inputs, tmp_path / "out")
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "   job job-1: queued",
        "   running: loading",
        "   running: recalibrating",
        "   running: evaluating",
        "   succeeded",
    ]
