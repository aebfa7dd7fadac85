"""`recalib submit` (not implemented yet)."""

from __future__ import annotations

import argparse

from recalib.errors import InternalError


def add_parser(parser: argparse.ArgumentParser) -> None:
    del parser


def main(args: argparse.Namespace) -> int:
    raise InternalError("recalib submit is not implemented yet")
