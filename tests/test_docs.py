"""The README documents the contract: every setting, job option and report field has a row in its
table (the first cell of a row under the table's heading; a mention elsewhere does not count), and
no row names something the contract lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recalib.contract import JobOptions, Preprocess, Report
from recalib.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")

OPTIONS_HEADING = "### Job options"
SETTINGS_HEADING = "## Settings"
REPORT_HEADING = "### `report.json`"


def table_names(markdown: str, heading: str) -> list[str]:
    """The backticked names in the first cell of each body row of the first table under the
    heading that starts with ``heading`` (up to the next heading of the same or a higher level)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = markdown.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    assert len(starts) == 1, f"expected one heading {heading!r}, found {len(starts)}"
    rows: list[str] = []
    for line in lines[starts[0] + 1 :]:
        hashes = len(line) - len(line.lstrip("#"))
        if 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            break
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break  # the first table ended
    body = [row for row in rows[1:] if not re.fullmatch(r"\|[\s|:-]+\|?", row)]  # no header/rule
    return [name for row in body for name in re.findall(r"`([^`]+)`", row.split("|")[1])]


def _option_rows() -> list[str]:
    return table_names(README, OPTIONS_HEADING)


def test_a_name_outside_the_table_rows_does_not_count() -> None:
    markdown = "\n".join(
        [
            "## Settings",
            "`RECALIB_PROSE` is mentioned here.",
            "| variable | default | meaning |",
            "|---|---|---|",
            "| `RECALIB_A` | `1` | see `RECALIB_IN_MEANING` |",
            "| `RECALIB_B`, `RECALIB_C` | `2` | two in one row |",
            "",
            "| `RECALIB_SECOND_TABLE` | | |",
            "## Next",
            "| `RECALIB_NEXT_SECTION` | | |",
        ]
    )
    assert table_names(markdown, "## Settings") == ["RECALIB_A", "RECALIB_B", "RECALIB_C"]


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_has_a_row(name: str) -> None:
    assert f"RECALIB_{name.upper()}" in table_names(README, SETTINGS_HEADING)


@pytest.mark.parametrize("name", sorted(Report.model_fields))
def test_every_report_field_has_a_row(name: str) -> None:
    assert name in table_names(README, REPORT_HEADING)


@pytest.mark.parametrize("name", sorted(JobOptions.model_fields))
def test_every_job_option_has_a_row(name: str) -> None:
    assert name in _option_rows()


@pytest.mark.parametrize("name", sorted(Preprocess.model_fields))
def test_every_preprocess_option_has_a_row(name: str) -> None:
    assert f"preprocess.{name}" in _option_rows()


def test_no_row_names_something_the_contract_lacks() -> None:
    options = set(JobOptions.model_fields) | {f"preprocess.{n}" for n in Preprocess.model_fields}
    settings = {f"RECALIB_{n.upper()}" for n in Settings.model_fields}
    assert set(_option_rows()) - options == set()
    assert set(table_names(README, SETTINGS_HEADING)) - settings == set()
    assert set(table_names(README, REPORT_HEADING)) - set(Report.model_fields) == set()


def section(markdown: str, heading: str) -> str:
    """The text under the heading that starts with ``heading``, up to the next heading of the same
    or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = markdown.index("\n" + heading) + 1
    pattern = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE)
    end = pattern.search(markdown, start + len(heading))
    return markdown[start : end.start() if end else len(markdown)]


FLAG_FIELDS = [n for n in JobOptions.model_fields if n != "preprocess"]
FLAG_FIELDS += list(Preprocess.model_fields)


@pytest.mark.parametrize("name", FLAG_FIELDS)
def test_every_option_flag_is_listed_for_recalib_run(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    assert f"`{flag}`" in section(README, "## Recalibrate locally: `recalib run`")
