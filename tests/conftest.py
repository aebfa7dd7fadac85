"""Shared fixtures: the real digits domain-shift case (trained once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_case():
    """A BN CNN trained on scikit-learn's digits, with a shifted target domain (worker.digits)."""
    from worker.digits import make_digits_case

    return make_digits_case(seed=0)


@pytest.fixture(scope="session")
def digits_files(digits_case, tmp_path_factory) -> dict[str, Path]:
    """The digits case on disk: ``model`` (.pt2), ``calibration`` and ``evaluation`` (.npz)."""
    from worker.digits import write_demo_files

    return write_demo_files(digits_case, tmp_path_factory.mktemp("digits"))
