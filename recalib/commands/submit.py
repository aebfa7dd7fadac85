"""``recalib submit``: upload a model and data to a recalib server, queue a job, optionally wait.

For pipelines: the exit code says how it went (``recalib.errors``): 0 success, 2 bad arguments or
request, 3 ``--fail-if-worse`` and the verdict is worse (or ``--require better`` and it is not
better), 4 the job failed, 5 it was cancelled,
1 the server is unreachable or another internal fault.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from recalib import defaults
from recalib.client import RecalibClient
from recalib.commands import report_text
from recalib.commands.job_options import (
    ARCH_HELP,
    CALIB_HELP,
    EVAL_HELP,
    MODEL_HELP,
    SOURCE_EVAL_HELP,
    add_option_flags,
    add_require_flag,
    options_from_args,
)
from recalib.contract import JobPublic, JobStatus
from recalib.errors import (
    EXIT_CANCELLED,
    EXIT_DRIFTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_WORSE,
    InvalidOptionError,
)
from recalib.verdict import explain, fails


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help=MODEL_HELP)
    parser.add_argument("--calib", type=Path, required=True, metavar="DATA", help=CALIB_HELP)
    parser.add_argument("--eval", type=Path, metavar="DATA", help=EVAL_HELP)
    parser.add_argument("--source-eval", type=Path, metavar="DATA", help=SOURCE_EVAL_HELP)
    parser.add_argument(
        "--server",
        metavar="URL",
        default=os.environ.get("RECALIB_SERVER", defaults.SERVER_URL),
        help="Server URL (env RECALIB_SERVER; default %(default)s).",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("RECALIB_API_KEY"),
        help="API key (env RECALIB_API_KEY).",
    )
    add_option_flags(parser, title="job options (the server's defaults when left out)")
    parser.add_argument("--arch", metavar="MODULE:FUNCTION", help=ARCH_HELP)
    parser.add_argument(
        "--arch-kwargs",
        metavar="JSON",
        default="{}",
        help="Keyword arguments of --arch, a JSON object.",
    )
    parser.add_argument("--wait", action="store_true", help="Follow the job until it ends.")
    parser.add_argument(
        "--download", type=Path, metavar="DIR", help="Save report + models (implies --wait)."
    )
    parser.add_argument(
        "--fail-if-worse",
        action="store_true",
        help="Exit 3 when the verdict is worse (implies --wait).",
    )
    parser.add_argument(
        "--kind",
        choices=("recalibrate", "drift"),
        help="recalibrate (default), or drift: only check whether the data drifted from the "
        "model's BN statistics (changes nothing, writes no model).",
    )
    parser.add_argument(
        "--fail-if-drifted",
        action="store_true",
        help=f"With --kind drift: exit {EXIT_DRIFTED} when recalibration is recommended "
        "(implies --wait).",
    )
    add_require_flag(parser, " (implies --wait)")
    parser.add_argument("--json", action="store_true", help="Print the job as JSON on stdout.")
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="Resubmitting with the same key returns the same job.",
    )
    parser.add_argument(
        "--poll-s",
        type=float,
        metavar="SECONDS",
        default=0.5,
        help="Status poll period, seconds (default %(default)s).",
    )


def _arch_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOptionError(f"--arch-kwargs is not JSON: {exc}", field="arch_kwargs") from exc
    if not isinstance(value, dict):
        raise InvalidOptionError("--arch-kwargs must be a JSON object", field="arch_kwargs")
    return value


def main(args: argparse.Namespace) -> int:
    options = options_from_args(args)  # bad values fail here, before any upload; only the
    # flags given are sent (model_fields_set), the rest keep the contract's defaults
    arch_kwargs = _arch_kwargs(args.arch_kwargs)
    wait = (
        args.wait
        or args.download is not None
        or args.fail_if_worse
        or bool(args.require)
        or args.fail_if_drifted
    )
    if args.fail_if_drifted and args.kind != "drift":
        raise InvalidOptionError("--fail-if-drifted needs --kind drift", field="--fail-if-drifted")
    with RecalibClient(args.server, api_key=args.api_key) as client:
        ids = {}
        paths = (("model", args.model), ("calib", args.calib), ("eval", args.eval))
        for role, path in (*paths, ("source_eval", args.source_eval)):
            if path is not None:
                ids[role] = client.upload_file(path).id
                _note(f"{role}: {path} → {ids[role]}")
        job = client.create_job(
            ids["model"],
            ids["calib"],
            ids.get("eval"),
            options=options,
            arch=args.arch,
            arch_kwargs=arch_kwargs,
            idempotency_key=args.idempotency_key,
            kind=args.kind,
            source_eval_file=ids.get("source_eval"),
        )
        _note(f"job {job.id} {job.status.value}")
        if not wait:
            _out(job.model_dump_json(indent=2) if args.json else job.id)
            return EXIT_OK
        job = _follow(client, job.id, args.poll_s)
        if job.status == JobStatus.succeeded and args.download is not None:
            _download_all(client, job, args.download)
    _out(job.model_dump_json(indent=2) if args.json else _summary(job))
    return exit_code(
        job, fail_if_worse=args.fail_if_worse, require=args.require,
        fail_if_drifted=args.fail_if_drifted,
    )  # fmt: skip


def exit_code(
    job: JobPublic, *, fail_if_worse: bool, require: str | None = None,
    fail_if_drifted: bool = False,
) -> int:  # fmt: skip
    """0, or the code of a failed/cancelled job, or EXIT_WORSE when the verdict fails the gate
    asked for (:func:`recalib.verdict.fails`), or EXIT_DRIFTED for a drift check that
    recommends recalibrating when ``fail_if_drifted``."""
    if job.status == JobStatus.failed:
        return EXIT_JOB_FAILED
    if job.status == JobStatus.cancelled:
        return EXIT_CANCELLED
    gated = fail_if_worse or require is not None
    if (
        gated
        and job.result is not None
        and fails(job.result.verdict, fail_if_worse=fail_if_worse, require=require)
    ):
        return EXIT_WORSE
    drift = job.result.drift if job.result is not None else None
    if fail_if_drifted and drift is not None and drift.recommend_recalibration:
        return EXIT_DRIFTED
    return EXIT_OK


def _follow(client: RecalibClient, job_id: str, poll_s: float) -> JobPublic:
    """Wait for the job with a progress bar on stderr (shown only on a terminal)."""
    from tqdm import tqdm

    with tqdm(desc=job_id, file=sys.stderr, disable=None, unit="batch", leave=False) as bar:

        def on_progress(job: JobPublic) -> None:
            progress = job.progress
            bar.set_description(f"{job_id} {job.status.value}/{progress.phase.value}")
            if progress.total is not None and bar.total != progress.total:
                bar.reset(total=progress.total)
            bar.n = progress.done
            bar.refresh()

        return client.wait(job_id, on_progress=on_progress, poll_s=poll_s)


def _download_all(client: RecalibClient, job: JobPublic, dest: Path) -> None:
    result = job.result
    which_all = ["report"] + (["checkpoint"] if result and result.checkpoint else [])
    which_all += ["folded"] if result and result.folded else []
    if result and any(e.artifact.format == "onnx" for e in result.exports):
        which_all.append("onnx")
    for which in which_all:
        path = client.download(job.id, which, dest)  # type: ignore[arg-type]
        _note(f"{which}: {path} (sha256 verified)")


def _summary(job: JobPublic) -> str:
    if job.status != JobStatus.succeeded or job.result is None:
        error = f": [{job.error.type}] {job.error.message}" if job.error else ""
        return f"job {job.id} {job.status.value}{error}"
    report = job.result
    if report.drift is not None:
        advice = (
            "recalibrate" if report.drift.recommend_recalibration else "no recalibration needed"
        )
        return (
            f"job {job.id} succeeded: drift {report.drift.score:.4f} (threshold "
            f"{report.drift.threshold:g}): {advice}"
        )
    headline = report_text.headline(report)
    metric = f", {headline[0]} {_fmt(headline[1])} → {_fmt(headline[2])}" if headline else ""
    moved = report_text.output_change_text(report)
    moved_text = f", {moved}" if moved and not headline else ""
    task = f" ({report_text.task_of(report)})" if report.task is not None else ""
    return (
        f"job {job.id} succeeded: verdict {report.verdict.value}{task}{metric}{moved_text}\n"
        f"  {explain(report)}"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _note(text: str) -> None:
    sys.stderr.write(text + "\n")
