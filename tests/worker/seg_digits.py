"""A real segmentation case from scikit-learn's digits, for the segmentation tests.

Each 8×8 digit becomes an image and a mask: the mask marks the digit's pixels (intensity ≥ 5/16)
with class ``1 + digit`` and the rest as background 0, so 11 classes. A small BN encoder–decoder
is trained here on the clean digits (float64, one thread, deterministic, as ``worker.digits``
trains the demo model) and the target domain is the demo's shift (contrast ×0.35, brightness
+0.5, noise). The model returns ``{"out": N×11×8×8, "aux": N×11×4×4}`` like torchvision's
segmentation models. ``seg_iou`` scores predictions with NumPy, independently of recalib;
``write_seg_files`` writes a case as a job's files, ``mask_archive`` as an image archive with PNG
masks.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from worker.digits import _reproducible_torch, load_digits_arrays, shift_domain, split_indices

SEG_CLASSES = 11
FOREGROUND = 5 / 16


class SegNet(nn.Module):
    """Conv-BN-ReLU, strided Conv-BN-ReLU (4×4), upsample, Conv-BN-ReLU, 1×1 heads."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.enc2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.aux = nn.Conv2d(2 * width, SEG_CLASSES, 1)
        self.dec = nn.Sequential(
            nn.Conv2d(3 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.head = nn.Conv2d(width, SEG_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.enc1(x)
        deep = self.enc2(low)
        up = nn.functional.interpolate(deep, size=low.shape[-2:], mode="nearest")
        out = self.head(self.dec(torch.cat([low, up], dim=1)))
        return {"out": out, "aux": self.aux(deep)}


def make_masks(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """N×8×8 uint8 masks: ``1 + label`` where the digit is drawn, 0 elsewhere."""
    drawn = images[:, 0] >= FOREGROUND
    return np.where(drawn, (labels + 1)[:, None, None], 0).astype(np.uint8)


def train_segnet(images: np.ndarray, masks: np.ndarray, epochs: int = 12, seed: int = 0) -> SegNet:
    """Train a :class:`SegNet` (pixel cross-entropy on both heads); eval mode, float32."""
    with _reproducible_torch():
        torch.manual_seed(seed)
        model = SegNet().double()
        x, y = torch.from_numpy(images).double(), torch.from_numpy(masks).long()
        y_small = y[:, ::2, ::2]
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=generator).split(64):
                if len(idx) < 2:
                    continue
                optimizer.zero_grad()
                out = model(x[idx])
                loss = nn.functional.cross_entropy(out["out"], y[idx])
                loss = loss + 0.4 * nn.functional.cross_entropy(out["aux"], y_small[idx])
                loss.backward()
                optimizer.step()
    return model.float().eval()


@dataclass(frozen=True)
class SegCase:
    model: SegNet
    calibration: tuple[np.ndarray, np.ndarray]  # shifted images, masks
    evaluation: tuple[np.ndarray, np.ndarray]


def make_seg_case(seed: int = 0) -> SegCase:
    images, labels = load_digits_arrays()
    masks = make_masks(images, labels)
    train, calib, evaluation = split_indices(len(images), seed)
    model = train_segnet(images[train], masks[train], seed=seed)
    return SegCase(
        model=model,
        calibration=(shift_domain(images[calib], seed=1), masks[calib]),
        evaluation=(shift_domain(images[evaluation], seed=2), masks[evaluation]),
    )


def export_segnet(model: nn.Module, path: Path) -> Path:
    """``model`` as a ``.pt2`` with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1)
    example = torch.zeros(4, 1, 8, 8)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def write_seg_files(case: SegCase, out: Path) -> dict[str, Path]:
    """The case as a job's files under ``out``: ``model`` (``.pt2``), ``torchscript``, and
    ``calibration`` / ``evaluation`` (``.npz``: ``inputs``, mask ``labels``)."""
    files = {"model": export_segnet(case.model, out / "segnet.pt2")}
    files["torchscript"] = out / "segnet.ts"
    torch.jit.save(torch.jit.script(case.model), str(files["torchscript"]))
    for name, (x, masks) in (("calibration", case.calibration), ("evaluation", case.evaluation)):
        files[name] = out / f"{name}.npz"
        np.savez(files[name], inputs=x, labels=masks)
    return files


def seg_iou(
    predictions: np.ndarray, masks: np.ndarray, classes: int = SEG_CLASSES, ignore: int = 255
) -> tuple[float, float, list[float | None]]:
    """Pixel accuracy, mean IoU (classes present in labels or predictions) and IoU per class."""
    valid = masks != ignore
    labels, predicted = masks[valid].astype(np.int64), predictions[valid].astype(np.int64)
    accuracy = float((labels == predicted).mean())
    ious: list[float | None] = []
    for c in range(classes):
        union = np.sum((labels == c) | (predicted == c))
        ious.append(float(np.sum((labels == c) & (predicted == c)) / union) if union else None)
    present = [iou for iou in ious if iou is not None]
    return accuracy, float(np.mean(present)), ious


def predict(model: nn.Module, images: np.ndarray, key: str = "out") -> np.ndarray:
    """Per-pixel arg-max of ``model(images)[key]``, upsampled (bilinear) to 8×8 when smaller."""
    with torch.no_grad():
        logits = model(torch.from_numpy(images))[key]
        if logits.shape[-1] != images.shape[-1]:
            logits = nn.functional.interpolate(
                logits, size=images.shape[-2:], mode="bilinear", align_corners=False
            )
    return logits.argmax(1).numpy()


def png(array: np.ndarray, mode: str) -> bytes:
    """A uint8 array as a grayscale PNG (``mode`` ``L``) or a palette one (``P``, same ids)."""
    image = Image.fromarray(array, mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_archive(path: Path, images: np.ndarray, masks: np.ndarray, **overrides) -> Path:
    """``images/<i>.png`` (grayscale, the float images quantized) + ``masks/<i>.png``, every
    other mask a palette PNG; ``overrides`` replace members by name."""
    with zipfile.ZipFile(path, "w") as archive:
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            pixels = np.clip(np.round(image[0] * 255), 0, 255).astype(np.uint8)
            members = {
                f"data/images/{i:03d}.png": png(pixels, "L"),
                f"data/masks/{i:03d}.png": png(mask, "P" if i % 2 else "L"),
            }
            for name, data in members.items():
                if name not in overrides:
                    archive.writestr(name, data)
        for name, data in overrides.items():
            archive.writestr(name, data)
    return path


def quantized(images: np.ndarray) -> np.ndarray:
    """Float images as :func:`mask_archive` stores them (8-bit), back in [0, 1]."""
    return (np.clip(np.round(images * 255), 0, 255).astype(np.uint8) / np.float32(255)).astype(
        np.float32
    )
