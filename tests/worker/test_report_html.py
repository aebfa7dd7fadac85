"""report.html: written next to report.json by every job, self-contained, plots, escaping."""

from __future__ import annotations

import re
from collections import OrderedDict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recalib.contract import JobOptions, JobSpec, Report
from worker.evaluation import CONFIDENCE_BINS
from worker.pipeline import run_job
from worker.report_html import REPORT_HTML_FILE, render_report_html, write_report_html


class _Page(HTMLParser):
    """Every start tag with its attributes, the text, and the ids of SVG marks inside figures."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.figure: str | None = None
        self.marks: dict[str, list[str]] = {}
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "figure":
            self.figure = attributes.get("id")
        elif self.figure and attributes.get("id"):
            self.marks.setdefault(self.figure, []).append(str(attributes["id"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self.figure = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def marks_like(self, figure: str, pattern: str) -> list[str]:
        return [m for m in self.marks.get(figure, []) if re.fullmatch(pattern, m)]


@pytest.fixture(scope="module")
def digits_report(digits_files, tmp_path_factory) -> tuple[Report, Path]:
    out_dir = tmp_path_factory.mktemp("html")
    spec = JobSpec(
        model_path=str(digits_files["model"]),
        calibration_path=str(digits_files["calibration"]),
        eval_path=str(digits_files["evaluation"]),
        out_dir=str(out_dir),
        options=JobOptions(),
    )
    return run_job(spec), out_dir


def test_a_job_writes_report_html_with_one_mark_per_layer_class_and_bin(digits_report) -> None:
    report, out_dir = digits_report
    page = (out_dir / REPORT_HTML_FILE).read_text(encoding="utf-8")
    parsed = _Page(page)
    assert sum(1 for tag, _ in parsed.tags if tag == "svg") == 3
    layers = len(report.layers)
    assert layers == 3
    assert len(parsed.marks_like("layer-drift", r"shift-\d+")) == layers
    assert len(parsed.marks_like("layer-drift", r"var-\d+")) == layers
    assert report.after is not None and report.after.per_class_accuracy is not None
    classes = len(report.after.per_class_accuracy)
    assert classes == 10
    assert len(parsed.marks_like("per-class", r"class-after-\d+")) == classes
    assert len(parsed.marks_like("per-class", r"class-before-\d+")) == classes
    assert len(parsed.marks_like("confidence", r"conf-before-\d+")) == CONFIDENCE_BINS
    assert len(parsed.marks_like("confidence", r"conf-after-\d+")) == CONFIDENCE_BINS
    text = " ".join(parsed.text)
    assert report.before is not None
    for value in (report.before.top1, report.after.top1, report.before.loss, report.after.loss):
        assert f"{value:.4f}" in text
    assert report.verdict.value in text
    for layer in report.layers:
        assert layer.name in text


def test_per_class_accuracy_agrees_with_top1(digits_report, digits_files) -> None:
    """Weighted by class counts (from the eval file), per-class accuracy gives back top-1."""
    report, _ = digits_report
    counts = np.bincount(np.load(digits_files["evaluation"])["labels"], minlength=10)
    for metrics in (report.before, report.after):
        assert metrics is not None and metrics.per_class_accuracy is not None
        assert metrics.confidence_histogram is not None
        pairs = zip(metrics.per_class_accuracy, counts, strict=True)
        hits = sum(accuracy * n for accuracy, n in pairs if n)
        assert hits / counts.sum() == pytest.approx(metrics.top1, abs=1e-9)
        assert sum(metrics.confidence_histogram.counts) == metrics.samples


def test_the_page_is_self_contained(digits_report) -> None:
    _, out_dir = digits_report
    page = (out_dir / REPORT_HTML_FILE).read_text(encoding="utf-8")
    parsed = _Page(page)
    assert not [tag for tag, _ in parsed.tags if tag in {"script", "link", "img", "iframe"}]
    for tag, attributes in parsed.tags:
        for name, value in attributes.items():
            if name.startswith("xmlns"):
                continue  # namespace names, never fetched
            assert "http" not in (value or ""), (tag, name, value)
            if name in {"href", "xlink:href", "src"}:
                assert (value or "").startswith("#"), (tag, name, value)
    assert "http" not in " ".join(parsed.text)
    assert "@import" not in page
    assert "url(http" not in page


def _tiny_model_files(tmp_path: Path, bn_name: str, data_name: str) -> dict[str, Path]:
    """A 4 → 3 classifier whose BN layer is called ``bn_name`` (a whole pickled module) and
    labeled data files named ``data_name``."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 3)), (bn_name, nn.BatchNorm1d(3))]))
    model_path = tmp_path / "tiny.pt"
    torch.save(model.eval(), model_path)
    rng = np.random.default_rng(0)
    data_path = tmp_path / data_name
    inputs = rng.normal(2.0, 3.0, size=(64, 4)).astype(np.float32)
    np.savez(data_path, inputs=inputs, labels=rng.integers(0, 3, size=64))
    return {"model": model_path, "data": data_path}


def test_user_strings_are_escaped(tmp_path) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    files = _tiny_model_files(tmp_path, hostile, "cal<b>&\"x'.npz")
    spec = JobSpec(
        model_path=str(files["model"]),
        calibration_path=str(files["data"]),
        eval_path=str(files["data"]),
        out_dir=str(tmp_path / "out"),
        options=JobOptions(batch_size=16),
        allow_unsafe_pickle=True,
    )
    report = run_job(spec)
    assert [layer.name for layer in report.layers] == [hostile]
    page = (tmp_path / "out" / REPORT_HTML_FILE).read_text(encoding="utf-8")
    assert hostile not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "cal&lt;b&gt;&amp;&#34;x&#39;.npz" in page
    parsed = _Page(page)
    assert not [tag for tag, _ in parsed.tags if tag in {"img", "b", "script"}]
    assert hostile in " ".join(parsed.text)  # shown as text, in the layer table
    assert len(parsed.marks_like("layer-drift", r"shift-\d+")) == 1


def test_many_classes_become_a_scatter_and_missing_data_leaves_sections_out(
    digits_report,
) -> None:
    report, _ = digits_report
    assert report.before is not None and report.after is not None
    many = [k / 120 for k in range(120)]
    wide = report.model_copy(
        update={
            "before": report.before.model_copy(update={"per_class_accuracy": [None, *many[1:]]}),
            "after": report.after.model_copy(update={"per_class_accuracy": many}),
        }
    )
    parsed = _Page(render_report_html(wide))
    assert len(parsed.marks_like("per-class", r"class-after-\d+")) == 119  # class 0: no before

    bare = report.model_copy(
        update={
            "before": report.before.model_copy(
                update={"per_class_accuracy": None, "confidence_histogram": None}
            )
        }
    )
    parsed = _Page(render_report_html(bare))
    figures = {a.get("id") for tag, a in parsed.tags if tag == "figure"}
    assert figures == {"layer-drift"}


def test_a_failed_render_does_not_fail_the_job(digits_report, tmp_path, caplog) -> None:
    report, _ = digits_report
    assert write_report_html(report, tmp_path / "missing-dir") is None
    assert "could not write" in caplog.text


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (0.0, 0.62), (0.0, 0.98), (0.0, 1e-3), (0, 37)])
def test_axis_ticks_are_round_and_reach_the_largest_value(lo: float, hi: float) -> None:
    from worker.report_plots import nice_ticks

    ticks = nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert any(mantissa == pytest.approx(m) for m in (1, 2, 5))
    assert ticks[0] == lo and ticks[-1] >= hi and ticks[-2] < hi
    assert 3 <= len(ticks) <= 7
