"""The README documents the contract: every setting and every report field appears in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from recalib.contract import JobOptions, Report
from recalib.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_in_the_settings_table(name: str) -> None:
    assert f"`RECALIB_{name.upper()}`" in README


@pytest.mark.parametrize("name", sorted(Report.model_fields))
def test_every_report_field_is_documented(name: str) -> None:
    assert f"`{name}`" in README


@pytest.mark.parametrize("name", sorted(JobOptions.model_fields))
def test_every_job_option_is_documented(name: str) -> None:
    assert f"`{name}`" in README
