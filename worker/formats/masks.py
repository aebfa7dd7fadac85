"""Segmentation archives: ``images/<name>.<ext>`` with ``masks/<name>.png`` (same stem).

A mask is a grayscale (``L``) or palette (``P``) PNG whose pixel values (palette indices for
``P``) are the class ids, one per image pixel: it must have its image's size. Preprocessing is
applied to both alike (resize of the shorter side, center crop), the mask with nearest-neighbour
resampling so class ids are never blended. Every image needs its mask and every mask its image;
anything else is an error naming the entry, at open time (from the headers, nothing decoded).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from recalib.contract import Preprocess
from recalib.errors import InvalidDataError
from worker.formats.archives import ArchiveReader, Locator
from worker.formats.image_decode import (
    DECODE_ERRORS,
    checked_shape,
    crop_box,
    quiet_bomb_warnings,
    resized_size,
    undecodable,
)
from worker.formats.images import ArchiveLayout, ArchiveScan, ImageSamples, ScannedImage
from worker.formats.samples import DataLimits

MASK_MODES = frozenset({"L", "P", "1"})
"""Pillow modes whose pixel values are class ids (grayscale, palette indices, bilevel)."""


@dataclass
class MaskedImageSamples(ImageSamples):
    """Images with a segmentation mask each; labels are N×H×W int64 class ids."""

    mask_locators: list[Locator] = field(default_factory=list, repr=False)
    mask_names: list[str] = field(default_factory=list, repr=False)

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = [int(i) for i in indices]
        inputs, _ = super().get_batch(index)
        return inputs, self.get_labels(index)

    def get_labels(self, indices: Sequence[int]) -> torch.Tensor:
        if self.reader is None:
            raise InvalidDataError(f"{self.path.name}: the archive is closed", file=str(self.path))
        return torch.stack([self._decode_mask(int(i)) for i in indices])

    def labels(self) -> torch.Tensor | None:
        return None  # masks are read in chunks (get_labels), never all at once

    def _decode_mask(self, i: int) -> torch.Tensor:
        data = self.reader.fetch(self.mask_locators[i])  # type: ignore[union-attr]
        try:
            with quiet_bomb_warnings():
                mask = to_mask(Image.open(io.BytesIO(data)), self.preprocess, self.mask_names[i])
        except DECODE_ERRORS as exc:
            raise undecodable(self.path, self.mask_names[i], exc) from exc
        return checked_shape(self.path, self.mask_names[i], mask, self.label_shape)


def to_mask(image: Image.Image, preprocess: Preprocess, name: str = "mask") -> torch.Tensor:
    """A mask image as H×W int64 class ids, resized (nearest) and cropped like its image."""
    if image.mode not in MASK_MODES:
        raise ValueError(
            f"{name} has mode {image.mode}; a mask must be a grayscale (L) or palette (P) PNG"
        )
    if preprocess.resize is not None:
        size = resized_size(image.size, preprocess.resize)
        image = image.resize(size, Image.Resampling.NEAREST)
    if preprocess.center_crop is not None:
        image = image.crop(crop_box(image.size, preprocess.center_crop))
    return torch.from_numpy(np.asarray(image).astype(np.int64))


def segmentation_samples(
    path: Path,
    reader: ArchiveReader,
    scan: ArchiveScan,
    layout: ArchiveLayout,
    preprocess: Preprocess,
    limits: DataLimits,
) -> MaskedImageSamples:
    """The samples of an archive in ``images/`` + ``masks/`` layout (see the module docstring).

    Raises:
        InvalidDataError: an image without a mask or the reverse, a mask that is not a grayscale
            or palette PNG, a mask whose size differs from its image's, images of different sizes.
    """
    strip = layout.strip
    by_stem: dict[str, dict[str, ScannedImage]] = {"images": {}, "masks": {}}
    for parts, locator, shape in sorted(scan.images, key=lambda item: item[0]):
        folder, rest = parts[strip], parts[strip + 1 :]
        stem = PurePosixPath(*rest).stem
        if stem in by_stem[folder]:
            other = "/".join(by_stem[folder][stem][0])
            raise _error(path, f"{'/'.join(parts)} and {other} share the name {stem!r}")
        by_stem[folder][stem] = (parts, locator, shape)
    images, masks = by_stem["images"], by_stem["masks"]
    if not images:
        raise _error(path, "no usable images in images/ (only masks)")
    for stem, (parts, _, _) in masks.items():
        if stem not in images:
            raise _error(path, f"mask {'/'.join(parts)} has no image images/{stem}.<ext>")
    first_shape = None
    for stem, (parts, _, shape) in images.items():
        name = "/".join(parts)
        if stem not in masks:
            raise _error(path, f"{name} has no mask masks/{stem}.png (missing, or skipped)")
        mask_parts = masks[stem][0]
        mask_name = "/".join(mask_parts)
        if PurePosixPath(mask_parts[-1]).suffix.lower() != ".png":
            raise _error(path, f"mask {mask_name} is not a PNG; masks must be PNG files")
        (image_size, _), (mask_size, mode) = scan.headers[parts], scan.headers[mask_parts]
        if mode not in MASK_MODES:
            raise _error(
                path,
                f"mask {mask_name} has mode {mode}; masks must be grayscale (L) or palette (P) "
                "PNGs whose pixel values are class ids",
            )
        if mask_size != image_size:
            raise _error(
                path,
                f"mask {mask_name} is {mask_size[0]}×{mask_size[1]} pixels but its image {name} "
                f"is {image_size[0]}×{image_size[1]}; a mask must have its image's size",
            )
        if first_shape is None:
            first_shape = (name, shape)
        elif shape != first_shape[1]:
            raise _error(
                path,
                f"images differ in size after preprocessing ({first_shape[0]} → "
                f"{first_shape[1]}, {name} → {shape}); set preprocess.center_crop (and resize) "
                "so every sample has the same shape",
            )
    order = sorted(images)
    shape = images[order[0]][2]
    return MaskedImageSamples(
        path=path,
        has_labels=True,
        num_samples=len(order),
        sample_shape=shape,
        label_shape=shape[1:],
        skipped_entries=scan.skipped.count,
        skipped_examples=scan.skipped.examples,
        reader=reader,
        preprocess=preprocess,
        max_image_pixels=limits.max_image_pixels,
        names=["/".join(images[stem][0]) for stem in order],
        locators=[images[stem][1] for stem in order],
        mask_locators=[masks[stem][1] for stem in order],
        mask_names=["/".join(masks[stem][0]) for stem in order],
    )


def _error(path: Path, message: str) -> InvalidDataError:
    return InvalidDataError(f"{path.name}: {message}", file=str(path))
