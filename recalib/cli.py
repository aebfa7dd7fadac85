"""The ``recalib`` command: a thin dispatcher over one module per subcommand.

Each module in ``recalib.commands`` exposes ``add_parser(subparsers)`` and ``main(args) -> int``;
it is imported only when its subcommand runs, so ``recalib submit`` never imports torch.
Errors of the :mod:`recalib.errors` hierarchy end as one line on stderr and their exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from recalib import __version__
from recalib.errors import EXIT_INTERNAL, RecalibError

DESCRIPTION = (
    "recalib re-estimates the BatchNorm statistics of a trained PyTorch model on unlabeled data "
    "from a new (target) domain, so a model trained on one distribution keeps working on another "
    "without retraining; it compares the model before and after on labeled data and writes the "
    "recalibrated model in its own format with a report. Use 'recalib run' to recalibrate a model "
    "file locally, 'recalib serve' to start the REST API with a job queue and workers, "
    "'recalib drift' to check whether a model's data drifted enough to recalibrate, "
    "'recalib submit' to send a job to that server (for pipelines), 'recalib worker' to add a "
    "queue worker, and 'recalib demo' to see the whole thing on a small digits model. "
    "'recalib COMMAND --help' lists a command's options."
)
"""What ``recalib --help`` opens with: for users, not about this module."""

COMMANDS = {
    "run": "Recalibrate a model locally, no server.",
    "drift": "Check whether data drifted from a model's BN statistics enough to recalibrate.",
    "submit": "Submit a job to a recalib server (for pipelines).",
    "serve": "Start the API (and, with no Redis configured, an embedded Valkey and a worker).",
    "worker": "Start one queue worker.",
    "demo": "Run the digits domain-shift demo end to end through the REST API.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recalib", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"recalib {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at DEBUG level.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"recalib.commands.{name}")
        module.add_parser(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(f"recalib.commands.{args.command}")
    try:
        return int(module.main(args))
    except RecalibError as exc:
        where = exc.file or exc.field
        print(f"recalib: error: {exc.message}" + (f" [{where}]" if where else ""), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("recalib: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal fault: one line, the traceback only with --verbose
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        print(f"recalib: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
