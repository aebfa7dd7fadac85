"""The input sizes of exported programs: read from the program, fitted, guards as user errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recalib.errors import InvalidDataError
from worker.batch_limits import BatchLimits, probe_indices, shape_guards_as_data_errors
from worker.formats.export_program import ProgramInput, program_input


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten()).eval()


def test_program_input_reads_fixed_dynamic_and_bounded_batch() -> None:
    example = (torch.zeros(4, 1, 8, 8),)
    fixed = torch.export.export(_model(), example)
    dynamic = torch.export.export(
        _model(), example, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    bounded = torch.export.export(
        _model(), example, dynamic_shapes=({0: torch.export.Dim("batch", min=3, max=40)},)
    )
    assert program_input(fixed) == ProgramInput("input", (4, 1, 8, 8), 4, 4)
    assert program_input(dynamic) == ProgramInput("input", (None, 1, 8, 8), 1, None)
    assert program_input(bounded) == ProgramInput("input", (None, 1, 8, 8), 3, 40)
    assert program_input(bounded).describe() == "(*, 1, 8, 8)"


def test_fit_clamps_into_the_accepted_range() -> None:
    assert BatchLimits().fit(64) == 64
    assert BatchLimits(5, 5).fit(64) == BatchLimits(5, 5).fit(1) == 5
    assert BatchLimits(3, 40).fit(64) == 40 and BatchLimits(3, 40).fit(2) == 3
    assert probe_indices([7, 9], 5) == [7, 9, 7, 9, 7]


def test_a_guard_failure_becomes_a_data_error_naming_the_shape() -> None:
    program = torch.export.export(_model(), (torch.zeros(2, 1, 8, 8),))
    limits = BatchLimits(2, 2, program_input(program), "fixed.pt2")
    refused = pytest.raises(InvalidDataError, match=r"fixed\.pt2 refused a batch .*\(2, 1, 8, 8\)")
    with refused, shape_guards_as_data_errors(limits):
        program.module()(torch.zeros(3, 1, 8, 8))
    passed_on = pytest.raises(AssertionError, match="unrelated")  # other assertions pass through
    with passed_on, shape_guards_as_data_errors(limits):
        raise AssertionError("unrelated")
