"""Image archives (``.zip``, ``.tar``, ``.tar.gz``) as a :class:`SampleSet`, decoded on demand.

Layout: one optional wrapper folder shared by every image is stripped; then either every image
sits at the top (flat: unlabeled) or in ``<class>/<image>`` (labeled; classes sorted by name as
torchvision's ``ImageFolder`` does, label = index). Classes are the folders holding any file with
an image extension, even if all of them turn out corrupt, so one bad folder never shifts the
labels of the others. A single folder holding every image counts as the wrapper: a one-class
labeled archive needs ``root/<class>/<image>``. Other depths are an error. Exactly two folders,
``images`` and ``masks``, are segmentation data, whose samples :mod:`worker.formats.masks` builds
from the same scan (:func:`scan_archive`, then :func:`archive_layout`; :mod:`worker.formats.data`
picks the builder).

Skipped and counted (``skipped_entries``, ≤ 20 ``skipped_examples`` with the reason; logged once
per archive by :func:`worker.formats.samples.log_skipped`): files without an image extension,
hidden and ``__MACOSX`` files, links and devices, encrypted members, images Pillow cannot identify
or verify (JPEGs are test-decoded at reduced scale), images over ``max_image_pixels``
(decompression bombs; checked from the header, before decoding), images that
``preprocess.resize`` would take over ``max_image_pixels`` and images smaller than
``center_crop`` after resizing. A ``resize`` that takes every image over ``max_image_pixels``
(its square alone is larger) is an :class:`InvalidOptionError`, before the archive is read. A
decode failure that slips past these checks fails the batch with an :class:`InvalidDataError`
naming the member.

Each sample's final size is known at open time from the image headers: when images would differ
in size (no ``center_crop``), opening fails with a message naming two of them. Decoding and
preprocessing one image: :mod:`worker.formats.image_decode`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from recalib.contract import Preprocess
from recalib.errors import InvalidDataError, InvalidOptionError
from worker.formats.archives import ArchiveReader, Locator, Member, UnreadableMemberError
from worker.formats.image_decode import (
    DECODE_ERRORS,
    checked_shape,
    final_shape,
    peak_pixels,
    quiet_bomb_warnings,
    resized_size,
    to_tensor,
    undecodable,
)
from worker.formats.samples import DataLimits, SampleSet, SkippedEntries

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
DEFAULT_PREPROCESS = Preprocess.model_validate({})  # RGB, no resize, no crop, no normalization
_KIND_REASONS = {"link": "link, not followed", "encrypted": "encrypted"}


@dataclass
class ImageSamples(SampleSet):
    """Images kept as archive locators; decoded and preprocessed a batch at a time."""

    class_names: list[str] = field(default_factory=list)
    reader: ArchiveReader | None = field(default=None, repr=False)
    preprocess: Preprocess = field(default_factory=lambda: DEFAULT_PREPROCESS, repr=False)
    max_image_pixels: int = 50_000_000
    names: list[str] = field(default_factory=list, repr=False)
    locators: list[Locator] = field(default_factory=list, repr=False)
    label_tensor: torch.Tensor | None = field(default=None, repr=False)

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = [int(i) for i in indices]
        if self.reader is None:
            raise InvalidDataError(f"{self.path.name}: the archive is closed", file=str(self.path))
        inputs = torch.stack([self._decode(i) for i in index])
        if self.label_tensor is None:
            return inputs, torch.full((len(index),), -1, dtype=torch.long)
        return inputs, self.label_tensor[torch.as_tensor(index, dtype=torch.long)]

    def labels(self) -> torch.Tensor | None:
        return self.label_tensor

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def _decode(self, i: int) -> torch.Tensor:
        data = self.reader.fetch(self.locators[i])  # type: ignore[union-attr]
        try:
            with quiet_bomb_warnings():
                image = Image.open(io.BytesIO(data))
                if peak_pixels(image.size, self.preprocess) > self.max_image_pixels:
                    raise ValueError("the image or its resize grew past max_image_pixels")
                tensor = to_tensor(image, self.preprocess)
        except DECODE_ERRORS as exc:
            raise undecodable(self.path, self.names[i], exc) from exc
        return checked_shape(self.path, self.names[i], tensor, self.sample_shape)


ScannedImage = tuple[tuple[str, ...], Locator, tuple[int, int, int]]
"""An image an archive scan accepted: its name's path parts, its locator, its final C×H×W."""


@dataclass
class ArchiveScan:
    """What a pass over an image archive found (:func:`scan_archive`): the images it accepted,
    every member with an image extension (``candidates``, accepted or not: they decide the
    layout), each accepted image's header size and mode, and the entries it skipped."""

    images: list[ScannedImage] = field(default_factory=list)
    candidates: list[tuple[str, ...]] = field(default_factory=list)
    headers: dict[tuple[str, ...], tuple[tuple[int, int], str]] = field(default_factory=dict)
    skipped: SkippedEntries = field(default_factory=SkippedEntries)


@dataclass(frozen=True)
class ArchiveLayout:
    """How an archive's images are laid out (:func:`archive_layout`).

    ``strip``: wrapper folders left out of every name (0 or 1); ``classes``: the class folders,
    sorted (empty when flat); ``segmentation``: the folders are exactly ``images`` and ``masks``
    (samples built by :func:`worker.formats.masks.segmentation_samples`).
    """

    strip: int
    classes: list[str]

    @property
    def segmentation(self) -> bool:
        return self.classes == ["images", "masks"]


def check_resize(preprocess: Preprocess, limits: DataLimits) -> None:
    """A ``resize`` whose square alone is over ``max_image_pixels`` fits no image.

    Raises:
        InvalidOptionError: naming ``options.preprocess.resize`` and the limit.
    """
    side = preprocess.resize
    if side is not None and side * side > limits.max_image_pixels:
        raise InvalidOptionError(
            f"preprocess.resize {side} makes every image at least {side}×{side} = "
            f"{side * side} pixels, over max_image_pixels {limits.max_image_pixels} "
            f"(RECALIB_MAX_IMAGE_PIXELS); resize to at most "
            f"{math.isqrt(limits.max_image_pixels)} or raise the limit",
            field="options.preprocess.resize",
        )


def scan_archive(reader: ArchiveReader, preprocess: Preprocess, limits: DataLimits) -> ArchiveScan:
    """One pass over the archive's members: each image's header is read and its integrity
    checked; every other member, and an image that fails a check, is skipped with the reason
    (see the module docstring)."""
    scan = ArchiveScan()
    for member in reader.members():
        if member.kind == "dir":
            continue
        name = "/".join(member.parts)
        if any(p.startswith(".") or p == "__MACOSX" for p in member.parts):
            scan.skipped.add(name, "hidden or metadata file")
        elif member.kind != "file":
            scan.skipped.add(name, _KIND_REASONS.get(member.kind, "not a regular file"))
        elif Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            scan.skipped.add(name, "not an image (extension)")
        else:
            scan.candidates.append(member.parts)
            _probe(reader, member, name, scan, preprocess, limits)
    return scan


def _probe(
    reader: ArchiveReader,
    member: Member,
    name: str,
    scan: ArchiveScan,
    preprocess: Preprocess,
    limits: DataLimits,
) -> None:
    try:
        data = reader.read(member)
        with quiet_bomb_warnings():
            image = Image.open(io.BytesIO(data))
            size, mode = image.size, image.mode
            if size[0] * size[1] > limits.max_image_pixels:
                scan.skipped.add(name, f"{size[0]}×{size[1]} pixels, over max_image_pixels")
                return
            side = preprocess.resize
            if side is not None and peak_pixels(size, preprocess) > limits.max_image_pixels:
                scan.skipped.add(name, _resized_too_large(size, side))
                return
            _check_integrity(image)
    except Image.DecompressionBombError:
        scan.skipped.add(name, "over Pillow's decompression-bomb limit")
        return
    except (UnreadableMemberError, *DECODE_ERRORS) as exc:
        scan.skipped.add(name, f"corrupt ({str(exc)[:80] or type(exc).__name__})")
        return
    shape = final_shape(size, preprocess)
    if shape is None:
        scan.skipped.add(name, f"{size[0]}×{size[1]} is smaller than center_crop after resize")
        return
    scan.headers[member.parts] = (size, mode)
    scan.images.append((member.parts, reader.keep(member, data), shape))


def _resized_too_large(size: tuple[int, int], side: int) -> str:
    width, height = resized_size(size, side)
    return (
        f"{size[0]}×{size[1]} resizes to {width}×{height} pixels (preprocess.resize {side}), "
        "over max_image_pixels"
    )


def _check_integrity(image: Image.Image) -> None:
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    else:
        image.verify()


def archive_layout(path: Path, scan: ArchiveScan) -> ArchiveLayout:
    """The layout of the scanned images (see the module docstring).

    Raises:
        InvalidDataError: no usable image, or images at other depths than flat or
            ``<class>/<image>``.
    """
    if not scan.images:
        raise InvalidDataError(
            f"{path.name}: no usable images (skipped {scan.skipped.count} entries, e.g. "
            f"{scan.skipped.examples[:3]})",
            file=str(path),
        )
    strip = _wrapper_depth(scan.candidates)
    depths = {len(parts) - strip for parts in scan.candidates}
    if depths not in ({1}, {2}):
        raise InvalidDataError(
            f"{path.name}: images must all sit at the top (unlabeled) or in <class>/<image> "
            f"folders; found them {sorted(depths)} folders deep",
            file=str(path),
        )
    classes = sorted({parts[strip] for parts in scan.candidates}) if depths == {2} else []
    return ArchiveLayout(strip, classes)


def folder_samples(
    path: Path,
    reader: ArchiveReader,
    scan: ArchiveScan,
    layout: ArchiveLayout,
    preprocess: Preprocess,
    limits: DataLimits,
) -> ImageSamples:
    """The samples of a flat (unlabeled) or class-folder (labeled) archive.

    Raises:
        InvalidDataError: images of different sizes after preprocessing, naming two of them.
    """
    images = sorted(scan.images, key=lambda item: item[0])
    shapes = {shape for _, _, shape in images}
    if len(shapes) > 1:
        first, other = images[0], next(i for i in images if i[2] != images[0][2])
        raise InvalidDataError(
            f"{path.name}: images differ in size after preprocessing ({'/'.join(first[0])} → "
            f"{first[2]}, {'/'.join(other[0])} → {other[2]}); set preprocess.center_crop (and "
            "resize) so every sample has the same shape",
            file=str(path),
        )
    labeled, strip = bool(layout.classes), layout.strip
    index = {name: i for i, name in enumerate(layout.classes)}
    labels = torch.tensor([index[p[strip]] for p, _, _ in images]) if labeled else None
    return ImageSamples(
        path=path,
        has_labels=labeled,
        num_samples=len(images),
        sample_shape=images[0][2],
        skipped_entries=scan.skipped.count,
        skipped_examples=scan.skipped.examples,
        class_names=layout.classes,
        reader=reader,
        preprocess=preprocess,
        max_image_pixels=limits.max_image_pixels,
        names=["/".join(p) for p, _, _ in images],
        locators=[locator for _, locator, _ in images],
        label_tensor=labels,
    )


def _wrapper_depth(candidates: list[tuple[str, ...]]) -> int:
    """1 when every image lies under one shared top folder (stripped), else 0."""
    tops = {parts[0] for parts in candidates}
    return 1 if len(tops) == 1 and all(len(parts) > 1 for parts in candidates) else 0
