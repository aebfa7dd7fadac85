"""Failures inside user-supplied arch code are the input's problem: invalid-model naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from recalib.contract import JobSpec
from recalib.errors import EXIT_USER_ERROR, InvalidModelError
from tests.worker import refusing_archs
from worker.formats.models import read_model
from worker.pipeline import run_job

VERSIONED = f"{refusing_archs.MODULE}:versioned_net"
EXPLODING = f"{refusing_archs.MODULE}:exploding_net"
ALLOWLIST = [refusing_archs.MODULE]


@pytest.fixture(scope="module")
def files(digits_case, tmp_path_factory) -> dict[str, Path]:
    """The VersionedNet's weights as .safetensors (no version metadata) and as .pt (with it)."""
    root = tmp_path_factory.mktemp("archs")
    state = refusing_archs.versioned_net().state_dict()
    paths = {
        "safetensors": root / "versioned.safetensors",
        "pt": root / "versioned.pt",
        "parallel_pt": root / "versioned-parallel.pt",
    }
    safetensors.torch.save_file(dict(state), str(paths["safetensors"]))
    torch.save(state, paths["pt"])  # torch.save keeps state._metadata (the versions)
    parallel = nn.DataParallel(refusing_archs.versioned_net()).state_dict()  # "module." keys
    torch.save({"epoch": 3, "state_dict": parallel}, paths["parallel_pt"])
    inputs, labels = digits_case.shifted_calibration
    paths["calibration"] = root / "calibration.npz"
    np.savez(paths["calibration"], inputs=inputs, labels=labels)
    return paths


def _spec(files: dict[str, Path], out_dir: Path, arch: str, model: str = "safetensors") -> JobSpec:
    return JobSpec(
        model_path=str(files[model]),
        calibration_path=str(files["calibration"]),
        out_dir=str(out_dir),
        arch=arch,
        arch_allowlist=ALLOWLIST,
    )


@pytest.mark.parametrize("model", ["pt", "parallel_pt"])
def test_torch_save_state_dict_keeps_its_versions(files, model) -> None:
    """The version metadata survives unwrapping and the DataParallel prefix strip."""
    loaded = read_model(files[model], arch=VERSIONED, arch_allowlist=ALLOWLIST)
    assert isinstance(loaded.module, refusing_archs.VersionedNet)


def test_load_state_dict_hook_refusing_is_invalid_model(files, tmp_path) -> None:
    with pytest.raises(InvalidModelError) as info:
        run_job(_spec(files, tmp_path, VERSIONED))
    error = info.value
    assert error.type_slug == "invalid-model"
    assert error.exit_code == EXIT_USER_ERROR
    assert error.message == (
        f"arch {VERSIONED} refused the state_dict: "
        "ValueError: version should be set to 1 or 2 instead of None "
        "(versioned.safetensors keeps no state_dict version metadata; "
        f"if {VERSIONED} needs it, save the state_dict with torch.save as .pt)"
    )
    assert error.file == str(files["safetensors"])
    assert isinstance(error.__cause__, ValueError)


def test_constructor_raising_is_invalid_model(files, tmp_path) -> None:
    with pytest.raises(InvalidModelError) as info:
        run_job(_spec(files, tmp_path, EXPLODING))
    error = info.value
    assert error.type_slug == "invalid-model"
    assert error.message == (
        f"arch {EXPLODING} failed to build the model: "
        "RuntimeError: this architecture needs a GPU build of its extension"
    )
    assert error.field == "arch"
