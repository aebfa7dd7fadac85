"""``recalib run``: recalibrate a model locally (no server) and write report.json + checkpoints.

The job-option flags are generated from the contract (:mod:`recalib.commands.job_options`, shared
with ``recalib submit``) and validated by it, so a bad value ends as one line naming the flag and
exit code 2. The verdict does not change the exit code unless ``--fail-if-worse`` is given (then 3
when the verdict is ``worse``, as for ``submit``) or ``--require better`` (3 on any other verdict;
the gates are :func:`recalib.verdict.fails`).
Operator settings (``RECALIB_ARCH_ALLOWLIST``, ``RECALIB_ALLOW_UNSAFE_PICKLE``, archive limits)
apply here as in the service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recalib.commands import report_text, require
from recalib.commands.job_options import (
    ARCH_HELP,
    CALIB_HELP,
    EVAL_HELP,
    MODEL_HELP,
    SOURCE_EVAL_HELP,
    add_option_flags,
    add_require_flag,
    flag,
    options_from_args,
)
from recalib.contract import JobSpec, Progress, Report, Verdict
from recalib.errors import EXIT_OK, EXIT_WORSE, InvalidOptionError, NotFoundError
from recalib.settings import get_settings
from recalib.verdict import explain, fails

_EVALUATED_ON = {
    "eval_file": "the eval file",
    "holdout": "held-out calibration data",
    "calibration": "the calibration data (unlabeled)",
    None: "the data",
}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--calib", required=True, metavar="DATA", help=CALIB_HELP)
    parser.add_argument("--eval", metavar="DATA", help=EVAL_HELP)
    parser.add_argument("--source-eval", metavar="DATA", help=SOURCE_EVAL_HELP)
    parser.add_argument("--arch", metavar="MODULE:FUNCTION", help=ARCH_HELP)
    parser.add_argument(
        "--arch-kwargs",
        metavar="JSON",
        default="{}",
        help="Keyword arguments of --arch, a JSON object.",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="Output directory (default: recalib-out/<model file name>)."
    )
    add_option_flags(parser)
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="Load a .pt file holding a whole pickled model (this runs code from the file: only "
        "for files you trust).",
    )
    parser.add_argument("--json", action="store_true", help="Print report.json instead of a table.")
    parser.add_argument(
        "--fail-if-worse", action="store_true", help="Exit 3 when the verdict is worse."
    )
    add_require_flag(parser)


def build_spec(args: argparse.Namespace) -> JobSpec:
    """The :class:`JobSpec` of the arguments; bad values raise :class:`InvalidOptionError`."""
    paths = (("model", args.model), ("calibration", args.calib), ("eval", args.eval))
    for label, path in (*paths, ("source eval", args.source_eval)):
        if path is not None and not Path(path).is_file():
            raise NotFoundError(f"{label} file not found", file=path)
    options = options_from_args(args)
    try:
        settings = get_settings()
    except ValidationError as exc:
        raise _settings_error(exc) from None
    try:
        arch_kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as exc:
        raise InvalidOptionError(f"not valid JSON: {exc}", field="--arch-kwargs") from None
    if not isinstance(arch_kwargs, dict):
        raise InvalidOptionError("must be a JSON object", field="--arch-kwargs")
    out_dir = args.out or str(Path("recalib-out") / Path(args.model).stem)
    try:
        return JobSpec(
            model_path=args.model,
            calibration_path=args.calib,
            eval_path=args.eval,
            source_eval_path=args.source_eval,
            arch=args.arch,
            arch_kwargs=arch_kwargs,
            options=options,
            out_dir=out_dir,
            allow_unsafe_pickle=args.allow_unsafe_pickle or settings.allow_unsafe_pickle,
            vet_models=settings.vet_models,
            arch_allowlist=settings.arch_allowlist,
            max_archive_members=settings.max_archive_members,
            max_archive_bytes=settings.max_archive_bytes,
            max_image_pixels=settings.max_image_pixels,
        )
    except ValidationError as exc:  # arch_kwargs the contract refuses (depth, size, NaN)
        error = exc.errors()[0]
        where = flag(str(error["loc"][0])) if error["loc"] else "--arch-kwargs"
        raise InvalidOptionError(error["msg"].removeprefix("Value error, "), field=where) from None


def _settings_error(exc: ValidationError) -> InvalidOptionError:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    where = "RECALIB_" + loc[0].upper() if loc else "RECALIB_* environment"
    value = f" (got {error['input']!r})" if loc and "input" in error else ""
    message = error["msg"].removeprefix("Value error, ")
    return InvalidOptionError(f"{message}{value}", field=where)


def main(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    require("worker", "run")
    from worker.runner.sandboxed import run_spec  # the same sandboxed path as the service's

    with _ProgressBar() as bar:
        report = run_spec(spec, get_settings(), on_progress=bar.update)
    if args.json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        sys.stdout.write(summary(report, Path(spec.out_dir)) + "\n")
    if fails(report.verdict, fail_if_worse=args.fail_if_worse, require=args.require):
        return EXIT_WORSE
    return EXIT_OK


def summary(report: Report, out_dir: Path) -> str:
    """A short human-readable table of the report."""
    rows = [("", "before", "after")]
    rows += [(label, _number(b), _number(a)) for label, b, a in report_text.metric_rows(report)]
    lines = [f"{a:<16}{b:>10}{c:>10}" for a, b, c in rows]
    for extra in (report_text.task_line(report), report_text.output_change_text(report)):
        if extra:
            lines.append(extra)
    evaluated = report.after.samples if report.after else 0
    change = report.prediction_change
    pixels = "pixel " if report_text.task_of(report) == "segmentation" else ""
    lines.append(
        f"verdict: {report.verdict.value}"
        + f" on {evaluated} samples of {_EVALUATED_ON[report.data.evaluated_on]}"
        + (f", {pixels}predictions changed: {change:.1%}" if change is not None else "")
    )
    lines.append(f"  {explain(report)}")
    headline = report_text.headline(report)
    if report.verdict is Verdict.worse and headline is not None:
        name, before, after = headline
        lines.append(
            f"warning: {name} is LOWER after recalibration ({before:.4f} → {after:.4f}); keep "
            "the original model for this data"
        )
    if report.skipped_layers:
        lines.append(f"skipped BN layers: {', '.join(s.name for s in report.skipped_layers)}")
    if report.data.skipped_entries:
        lines.append(f"skipped archive entries: {report.data.skipped_entries} (see report.json)")
    calib = report.calibration
    lines.append(
        f"calibration: {calib.samples} samples, {calib.batches} batches, {report.bn_layers} BN "
        f"layers, estimator {calib.estimator.value}, device {report.device}"
        + (", stopped early" if calib.stopped_early else "")
    )
    if report.checkpoint is not None:
        lines.append(f"checkpoint: {out_dir / report.checkpoint.file}")
    if report.folded is not None:
        lines.append(
            f"folded: {out_dir / report.folded.artifact.file} "
            f"(max |diff| {report.folded.max_abs_diff:.2e})"
        )
    lines.append(f"report: {out_dir / 'report.json'} ({report.timings_s['total']:.1f} s)")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class _ProgressBar:
    """A tqdm bar per phase on a terminal; elsewhere one line per phase once a run is long."""

    QUIET_S = 10.0

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.bar: Any = None
        self.phase: str | None = None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, progress: Progress) -> None:
        phase = progress.phase.value
        if phase != self.phase or progress.done == 0:
            self.phase = phase
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(
                    desc=phase, total=progress.total, unit="batch", file=sys.stderr, leave=False
                )
            elif time.monotonic() - self.started > self.QUIET_S:
                total = f" ({progress.total} batches)" if progress.total else ""
                sys.stderr.write(f"recalib: {phase}{total}\n")
        if self.bar is not None and progress.done > self.bar.n:
            self.bar.update(progress.done - self.bar.n)  # redraws at most every 0.1 s
