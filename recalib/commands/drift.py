"""``recalib drift``: should this model be recalibrated for this data? A local drift check.

One eval-mode pass over ``--data`` in the same sandbox as ``recalib run`` (``kind: drift``): per BN
layer, how far the data's activation statistics are from the stored ones, and a recommendation
against ``--drift-threshold``. Nothing is written but ``report.json``/``report.html``. Exit 0
either way; with ``--fail-if-drifted``, 6 when recalibration is recommended (for pipelines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recalib.commands import require
from recalib.commands.job_options import ARCH_HELP, CALIB_HELP, MODEL_HELP, add_option_flags
from recalib.contract import JobKind, Report
from recalib.errors import EXIT_DRIFTED, EXIT_OK, InvalidOptionError
from recalib.settings import get_settings


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--data", required=True, metavar="DATA", help=CALIB_HELP)
    parser.add_argument("--arch", metavar="MODULE:FUNCTION", help=ARCH_HELP)
    parser.add_argument(
        "--arch-kwargs", metavar="JSON", default="{}", help="Keyword arguments of --arch, JSON."
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="Output directory (default: recalib-out/<model file name>.drift).",
    )
    add_option_flags(parser)
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="Load a .pt file holding a whole pickled model (runs code from the file).",
    )
    parser.add_argument("--json", action="store_true", help="Print report.json instead of a table.")
    parser.add_argument(
        "--fail-if-drifted",
        action="store_true",
        help=f"Exit {EXIT_DRIFTED} when the check recommends recalibrating.",
    )


def main(args: argparse.Namespace) -> int:
    from recalib.commands.run import build_spec

    if args.fold or args.register is not None:
        flag = "--fold" if args.fold else "--register"
        raise InvalidOptionError("a drift check writes no model", field=flag)
    args.calib, args.eval, args.source_eval = args.data, None, None  # build_spec reads them
    args.out = args.out or str(Path("recalib-out") / f"{Path(args.model).stem}.drift")
    spec = build_spec(args).model_copy(update={"kind": JobKind.drift})
    require("worker", "drift")
    from worker.runner.sandboxed import run_spec

    report = run_spec(spec, get_settings())
    if args.json:
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    else:
        sys.stdout.write(summary(report, Path(spec.out_dir)) + "\n")
    assert report.drift is not None  # a drift job's report has one
    if args.fail_if_drifted and report.drift.recommend_recalibration:
        return EXIT_DRIFTED
    return EXIT_OK


def summary(report: Report, out_dir: Path) -> str:
    """The recommendation, the score against the threshold and the layers that moved most."""
    drift = report.drift
    assert drift is not None
    verb = "RECALIBRATE" if drift.recommend_recalibration else "no recalibration needed"
    relation = ">" if drift.recommend_recalibration else "<="
    lines = [
        f"drift: {verb}: score {drift.score:.4f} {relation} threshold {drift.threshold:g} "
        f"on {drift.samples} samples, {len(drift.layers)} BN layers"
    ]
    if not drift.reliable:
        lines.append("warning: too few samples: the score is mostly sampling noise")
    by_name = {layer.name: layer for layer in drift.layers}
    lines.append(f"{'most moved layer':<28}{'score':>10}{'shift (σ)':>11}{'var ratio':>11}")
    for name in drift.most_moved:
        layer = by_name[name]
        lines.append(
            f"{name[:27]:<28}{layer.score:>10.4f}{layer.mean_shift_std:>11.3f}"
            f"{layer.var_ratio:>11.3f}"
        )
    lines.append(f"report: {out_dir / 'report.json'} ({report.timings_s['total']:.1f} s)")
    return "\n".join(lines)
