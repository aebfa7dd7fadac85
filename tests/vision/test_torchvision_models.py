"""torchvision models as a new user brings them: segmentation, googlenet, a detector (``vision``).

Untrained weights (nothing can be downloaded), real data: scikit-learn's digits scaled to 3×64×64,
with digit masks for segmentation. Each model runs as ``.pt2``, TorchScript and state_dict, and
its checkpoint must carry the statistics torch's own BN layers pool over the job's calibration
batches (tests/bn_oracle.py), whatever the format and the output structure.

These need torchvision: deselected by default (pyproject addopts), run with ``pytest -m vision``
in an environment that has it (``.ci/run`` makes one); torchvision missing there is a failure,
never a skip.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from recalib.contract import JobOptions, JobSpec, Verdict
from tests.bn_oracle import calibration_order, pooled_bn_statistics
from tests.worker.seg_digits import make_masks
from worker.digits import load_digits_arrays, shift_domain
from worker.pipeline import run_job

pytestmark = [pytest.mark.vision, pytest.mark.slow]

SIZE = 64
SEGMENTATION = (
    "torchvision.models.segmentation:lraspp_mobilenet_v3_large",
    {"weights": None, "weights_backbone": None, "num_classes": 11},
)
GOOGLENET = (
    "torchvision.models:googlenet",
    {"weights": None, "num_classes": 10, "aux_logits": False, "init_weights": True},
)


def _build(arch: tuple[str, dict]) -> nn.Module:
    import importlib

    module, name = arch[0].split(":")
    torch.manual_seed(0)
    return getattr(importlib.import_module(module), name)(**arch[1]).eval()


def _upsample(images: np.ndarray) -> np.ndarray:
    """N×1×8×8 → N×3×64×64 (nearest), float32."""
    big = images.repeat(SIZE // 8, axis=2).repeat(SIZE // 8, axis=3)
    return np.ascontiguousarray(big.repeat(3, axis=1), dtype=np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Shifted digits at 64×64: class labels and masks, calibration (64) and evaluation (32)."""
    import torchvision  # noqa: F401  (a vision run without torchvision fails here, loudly)

    out = tmp_path_factory.mktemp("vision-data")
    images, labels = load_digits_arrays()
    masks = make_masks(images, labels).repeat(SIZE // 8, axis=1).repeat(SIZE // 8, axis=2)
    files = {}
    for name, part, seed in (("calibration", slice(0, 64), 1), ("evaluation", slice(64, 96), 2)):
        x = _upsample(shift_domain(images[part], seed=seed))
        np.savez(out / f"{name}.npz", inputs=x, labels=labels[part])
        np.savez(out / f"{name}-masks.npz", inputs=x, labels=masks[part])
        files[name], files[f"{name}-masks"] = out / f"{name}.npz", out / f"{name}-masks.npz"
    return files


def _save(model: nn.Module, form: str, path: Path) -> Path:
    if form == "pt2":
        batch = torch.export.Dim("batch", min=2)
        example = (torch.rand(4, 3, SIZE, SIZE),)
        torch.export.save(torch.export.export(model, example, dynamic_shapes=({0: batch},)), path)
    elif form == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _job(model_path: Path, calibration: Path, evaluation: Path | None, out: Path, **kw) -> JobSpec:
    arch = kw.pop("arch", None)
    return JobSpec(
        model_path=str(model_path),
        calibration_path=str(calibration),
        eval_path=str(evaluation) if evaluation else None,
        out_dir=str(out),
        arch=arch[0] if arch else None,
        arch_kwargs=arch[1] if arch else {},
        options=JobOptions(batch_size=32, eval_batch_size=16, **kw),
    )


def _checkpoint(report, out: Path, form: str, arch) -> nn.Module:
    path = out / report.checkpoint.file
    if form == "pt2":
        return torch.export.load(path).module()
    if form == "torchscript":
        return torch.jit.load(str(path))
    from safetensors.torch import load_file

    model = _build(arch)
    model.load_state_dict(load_file(path))
    return model


def _oracle(model: nn.Module, calibration: Path, evaluation: Path | None):
    order = calibration_order(calibration, evaluation)
    inputs = torch.from_numpy(np.load(calibration)["inputs"])
    return pooled_bn_statistics(model, inputs, order, 32)


def _close(model: nn.Module, statistics) -> None:
    """The checkpoint's statistics are the oracle's (float32 through deep nets: 1e-3)."""
    buffers = dict(model.named_buffers())
    for name, (mean, var) in statistics.items():
        torch.testing.assert_close(
            buffers[f"{name}.running_mean"].double(), mean, rtol=1e-3, atol=1e-4, msg=name
        )
        torch.testing.assert_close(
            buffers[f"{name}.running_var"].double(), var, rtol=1e-3, atol=1e-4, msg=name
        )


@pytest.mark.parametrize("form", ["pt2", "torchscript", "state_dict"])
def test_lraspp_segmentation_in_every_format(data, tmp_path, form) -> None:
    model = _build(SEGMENTATION)
    path = _save(model, form, tmp_path / f"lraspp.{'pt2' if form == 'pt2' else 'pt'}")
    if form == "state_dict":
        path = path.rename(tmp_path / "lraspp.safetensors")
    arch = SEGMENTATION if form == "state_dict" else None
    calibration, evaluation = data["calibration-masks"], data["evaluation-masks"]
    report = run_job(_job(path, calibration, evaluation, tmp_path / "out", arch=arch))
    assert report.task.task == "segmentation" and report.task.output_key == "out"
    assert report.after.mean_iou is not None and report.after.pixels == 32 * SIZE * SIZE
    assert len(report.after.per_class_iou) == 11
    assert report.verdict in (Verdict.better, Verdict.worse, Verdict.unchanged)
    assert report.bn_layers > 30 and not report.skipped_layers
    _close(
        _checkpoint(report, tmp_path / "out", form, arch), _oracle(model, calibration, evaluation)
    )


@pytest.mark.parametrize("form", ["pt2", "torchscript", "state_dict"])
def test_googlenet_in_every_format(data, tmp_path, form) -> None:
    model = _build(GOOGLENET)
    path = _save(model, form, tmp_path / f"googlenet.{'pt2' if form == 'pt2' else 'pt'}")
    if form == "state_dict":
        path = path.rename(tmp_path / "googlenet.safetensors")
    arch = GOOGLENET if form == "state_dict" else None
    report = run_job(
        _job(path, data["calibration"], data["evaluation"], tmp_path / "out", arch=arch)
    )
    assert report.task.task == "classification"
    # scripted googlenet returns GoogLeNetOutputs(logits, aux_logits2, aux_logits1)
    expected_key = "logits" if form == "torchscript" else None
    assert report.task.output_key == expected_key, report.task
    assert report.after.top1 is not None and report.after.samples == 32
    _close(
        _checkpoint(report, tmp_path / "out", form, arch),
        _oracle(model, data["calibration"], data["evaluation"]),
    )


def test_detector_recalibrates_its_bn_and_skips_frozen_bn(data, tmp_path) -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    stem = model.backbone.body["0"]  # its BN becomes frozen, as in a pretrained backbone
    frozen = FrozenBatchNorm2d(stem[1].num_features, eps=stem[1].eps)
    frozen.running_mean.copy_(stem[1].running_mean)
    frozen.running_var.copy_(stem[1].running_var)
    stem[1] = frozen
    torch.save(model, tmp_path / "detector.pt")
    x = np.load(data["calibration"])["inputs"][:8]
    np.savez(tmp_path / "unlabeled.npz", inputs=x)
    spec = _job(tmp_path / "detector.pt", tmp_path / "unlabeled.npz", None, tmp_path / "out")
    spec = JobSpec.model_validate({**spec.model_dump(), "allow_unsafe_pickle": True})
    report = run_job(spec)
    assert report.task.task == "none" and report.verdict is Verdict.unknown
    assert report.task.output.startswith("list[2] of dict(boxes:")  # the probe batch
    assert [(s.name, s.type) for s in report.skipped_layers] == [
        ("backbone.body.0.1", "FrozenBatchNorm2d")
    ]
    assert "frozen BN" in report.skipped_layers[0].reason
    assert report.bn_layers > 30 and report.output_change is not None
    change = report.output_change
    assert change.tensors + change.shape_changed == 2 * 8  # boxes and scores per image
    saved = torch.load(tmp_path / "out" / report.checkpoint.file, weights_only=False)
    reference = copy.deepcopy(model)
    statistics = _oracle(reference, tmp_path / "unlabeled.npz", None)
    statistics.pop("backbone.body.0.1", None)  # frozen: never touched
    _close(saved, statistics)
    torch.testing.assert_close(saved.backbone.body["0"][1].running_mean, frozen.running_mean)
