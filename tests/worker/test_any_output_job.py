"""Jobs with several inputs and with outputs that are not one logits tensor, on real digits.

Several inputs: a tensor file with arrays ``x``, ``y`` (input_names), a TwoView model returning a
named tuple; TorchScript takes them by keyword, a ``.pt2`` program in order. Label-free: a model
whose output holds no logits (task ``none``) and a detector-like one whose per-image outputs
change length. References come from torch's own BN layers (the oracle) and NumPy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recalib.contract import JobOptions, JobSpec, Verdict
from recalib.errors import InvalidModelError, InvalidOptionError
from tests.bn_oracle import (
    assert_statistics_equal,
    calibration_order,
    pooled_bn_statistics,
    with_statistics,
)
from tests.worker.multi_input import TwoView, pooled_two_view
from worker.formats.data import open_samples
from worker.pipeline import run_job
from worker.splits import plan_data


def _mirror(x: np.ndarray) -> np.ndarray:
    return (np.flip(x, axis=3) * 0.9 + 0.05).astype(np.float32)


@pytest.fixture(scope="module")
def two_view_files(digits_case, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("twoview")
    model = TwoView(digits_case.model).eval()
    files = {"torchscript": out / "twoview.ts", "pt2": out / "twoview.pt2"}
    torch.jit.save(torch.jit.script(model), str(files["torchscript"]))
    batch = torch.export.Dim("batch", min=1)
    example = (torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8))
    program = torch.export.export(
        model.as_program(), example, dynamic_shapes=({0: batch}, {0: batch})
    )
    torch.export.save(program, files["pt2"])
    for name, (x, labels) in (
        ("calibration", digits_case.shifted_calibration),
        ("evaluation", digits_case.shifted_evaluation),
    ):
        files[name] = out / f"{name}.npz"
        np.savez(files[name], x=x, y=_mirror(x), labels=labels)
    return files


def _spec(files, model: str, out_dir: Path, **options) -> JobSpec:
    return JobSpec(
        model_path=str(files[model]),
        calibration_path=str(files["calibration"]),
        eval_path=str(files["evaluation"]),
        out_dir=str(out_dir),
        options=JobOptions(input_names=["x", "y"], **options),
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["torchscript", "pt2"])
def test_two_named_inputs_match_the_oracle(digits_case, two_view_files, tmp_path, model):
    report = run_job(_spec(two_view_files, model, tmp_path, fold=model == "pt2"))
    source = TwoView(digits_case.model).eval()
    options, names = JobOptions(input_names=["x", "y"]), ("x", "y")
    calibration, evaluation = (
        open_samples(two_view_files[name], input_names=names)
        for name in ("calibration", "evaluation")
    )
    order = plan_data(calibration, evaluation, options).calibration_indices
    x = torch.from_numpy(digits_case.shifted_calibration[0])
    statistics = pooled_two_view(source, x, torch.from_numpy(_mirror(x.numpy())), order, 64)
    oracle = with_statistics(source, statistics)
    ex, labels = digits_case.shifted_evaluation
    with torch.no_grad():
        logits = oracle(torch.from_numpy(ex), torch.from_numpy(_mirror(ex))).logits
    accuracy = float((logits.argmax(1).numpy() == labels).mean())

    assert report.task.task == "classification" and report.task.output_key == "logits"
    kind = "TwoViewOutput" if model == "torchscript" else "dict"
    assert report.task.output == f"{kind}(embedding: 2×128, logits: 2×10)"
    assert report.after.top1 == pytest.approx(accuracy, abs=1 / len(labels) + 1e-9)
    path = tmp_path / report.checkpoint.file
    saved = (
        torch.jit.load(str(path)) if model == "torchscript" else torch.export.load(path).module()
    )
    assert_statistics_equal(saved, statistics)
    if model == "pt2":
        assert report.folded is not None and report.folded.max_abs_diff < 1e-4
        folded = torch.export.load(tmp_path / report.folded.artifact.file)
        assert list(folded.graph_signature.user_inputs) == ["x", "y"]


def test_input_names_that_are_not_forward_arguments(two_view_files, tmp_path) -> None:
    data = np.load(two_view_files["calibration"])
    np.savez(tmp_path / "c.npz", x=data["x"], z=data["y"], labels=data["labels"])
    files = {**two_view_files, "calibration": tmp_path / "c.npz", "evaluation": tmp_path / "c.npz"}
    spec = _spec(files, "torchscript", tmp_path / "out")
    spec.options.input_names = ["x", "z"]
    spec = JobSpec.model_validate(spec.model_dump())
    with pytest.raises(InvalidOptionError, match=r"\['z'\] .* not arguments .* forward\(x, y\)"):
        run_job(spec)


def test_a_program_needs_as_many_input_names_as_inputs(two_view_files, tmp_path) -> None:
    spec = _spec(two_view_files, "pt2", tmp_path)
    spec = JobSpec.model_validate({**spec.model_dump(), "options": {"input_names": ["x"]}})
    with pytest.raises(InvalidOptionError, match=r"takes 2 inputs \['x', 'y'\] .* lists 1"):
        run_job(spec)
    data = np.load(two_view_files["calibration"])
    np.savez(tmp_path / "three.npz", x=data["x"], y=data["y"], w=data["y"])
    files = {
        **two_view_files,
        "calibration": tmp_path / "three.npz",
        "evaluation": tmp_path / "three.npz",
    }
    spec = JobSpec.model_validate(
        {**_spec(files, "pt2", tmp_path).model_dump(), "options": {"input_names": ["x", "y", "w"]}}
    )
    with pytest.raises(InvalidOptionError, match=r"takes 2 inputs \['x', 'y'\] .* lists 3") as info:
        run_job(spec)
    assert info.value.field == "options.input_names"


class _Embedder(nn.Module):
    """No logits anywhere: an embedding and a nested pair of feature maps."""

    def __init__(self, digits) -> None:
        super().__init__()
        self.features = copy.deepcopy(digits.features)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        embedding = self.features(x)
        return {"embedding": embedding, "parts": (embedding[:, :4], embedding.square())}


class _Detector(nn.Module):
    """Per image a dict of scores above 0.5: their number changes with the statistics."""

    def __init__(self, digits) -> None:
        super().__init__()
        self.net = copy.deepcopy(digits)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        scores = torch.sigmoid(self.net(x))
        return [{"scores": row[row > 0.5], "labels": (row > 0.5).nonzero()[:, 0]} for row in scores]


def _relative_change(before, after) -> float:
    diff = sum(
        float((b.double() - a.double()).square().sum()) for a, b in zip(before, after, strict=True)
    )
    return (diff / sum(float(a.double().square().sum()) for a in before)) ** 0.5


def _pickled_job(model: nn.Module, files: dict[str, Path], tmp_path: Path, **options) -> JobSpec:
    """A digits job on ``model`` saved whole with ``torch.save`` (so pickled: allowed here)."""
    torch.save(model.eval(), tmp_path / "model.pt")
    return JobSpec(
        model_path=str(tmp_path / "model.pt"),
        calibration_path=str(files["calibration"]),
        eval_path=str(files["evaluation"]),
        out_dir=str(tmp_path / "out"),
        allow_unsafe_pickle=True,
        options=JobOptions(**options),
    )


@pytest.mark.slow
def test_output_without_logits_is_evaluated_label_free(digits_case, digits_files, tmp_path):
    model = _Embedder(digits_case.model).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(4, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "embedder.pt2")
    x = np.load(digits_files["evaluation"])["inputs"]
    np.savez(tmp_path / "unlabeled.npz", inputs=x)
    spec = JobSpec(
        model_path=str(tmp_path / "embedder.pt2"),
        calibration_path=str(tmp_path / "unlabeled.npz"),
        out_dir=str(tmp_path / "out"),
    )
    report = run_job(spec)
    assert report.task.task == "none" and report.task.requested == "auto"
    assert report.task.output == "dict(embedding: 2×128, parts: tuple[2] of 2×4)"
    assert report.verdict is Verdict.unknown and report.prediction_change is None
    assert report.before.samples == len(x) and report.after.mean_entropy is None
    # the reference: the same outputs from the oracle model, compared in float64 here
    order = calibration_order(tmp_path / "unlabeled.npz", None)
    statistics = pooled_bn_statistics(model, torch.from_numpy(x), order, 64)
    oracle = with_statistics(model, statistics)
    with torch.no_grad():
        a, b = model(torch.from_numpy(x)), oracle(torch.from_numpy(x))
    flat = lambda o: [o["embedding"], *o["parts"]]  # noqa: E731
    change = report.output_change
    assert change.tensors == 3 * 2 and change.shape_changed == 0  # 3 tensors × 2 eval batches
    assert change.relative_l2 == pytest.approx(_relative_change(flat(a), flat(b)), rel=1e-3)


def test_labels_without_logits_ask_for_output_key_or_task_none(digits_case, digits_files, tmp_path):
    spec = _pickled_job(_Embedder(digits_case.model), digits_files, tmp_path)
    with pytest.raises(InvalidModelError, match=r"keys: \['embedding', 'parts'\].*task none"):
        run_job(spec)


@pytest.mark.slow
def test_detector_like_outputs_count_shape_changes(digits_case, digits_files, tmp_path):
    spec = _pickled_job(_Detector(digits_case.model), digits_files, tmp_path, task="none")
    report = run_job(spec)
    assert report.task.task == "none" and report.task.reason == "requested"
    assert report.verdict is Verdict.unknown and report.before.top1 is None
    change = report.output_change
    assert change.tensors + change.shape_changed == 360  # one float tensor per image
    assert change.shape_changed > 0
