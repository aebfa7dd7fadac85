"""One image member to a tensor: Pillow's decode errors, the :class:`Preprocess` steps, checks.

:func:`to_tensor` applies a :class:`~recalib.contract.Preprocess` (mode, resize of the shorter
side, center crop, [0, 1], mean/std); :func:`final_shape` predicts its result from the header
size alone, so an archive's sample shape is known before anything is decoded. Image archives
(:mod:`worker.formats.images`) and segmentation masks (:mod:`worker.formats.masks`) share them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from recalib.contract import Preprocess
from recalib.errors import InvalidDataError

DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)
"""What Pillow raises for a member that is not a (whole) image."""


def to_tensor(image: Image.Image, preprocess: Preprocess) -> torch.Tensor:
    """Apply ``preprocess`` (mode, resize shorter side, center crop, [0, 1], mean/std): C×H×W."""
    image = image.convert(preprocess.mode)
    if preprocess.resize is not None:
        image = image.resize(resized_size(image.size, preprocess.resize), Image.Resampling.BILINEAR)
    if preprocess.center_crop is not None:
        image = image.crop(crop_box(image.size, preprocess.center_crop))
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).to(torch.float32).div_(255.0)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if preprocess.mean is not None:
        tensor -= torch.tensor(preprocess.mean).view(-1, 1, 1)
    if preprocess.std is not None:
        tensor /= torch.tensor(preprocess.std).view(-1, 1, 1)
    return tensor.contiguous()


def crop_box(size: tuple[int, int], crop: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a centered ``crop``×``crop`` square."""
    left = round((size[0] - crop) / 2.0)
    top = round((size[1] - crop) / 2.0)
    return left, top, left + crop, top + crop


def resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``shorter`` (torchvision's ``Resize(int)`` rule)."""
    width, height = size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def peak_pixels(size: tuple[int, int], preprocess: Preprocess) -> int:
    """The most pixels an image of ``size`` occupies while preprocessed: decoded, then resized
    (the crop only shrinks it); bounded by ``max_image_pixels`` before anything is decoded."""
    width, height = size
    if preprocess.resize is not None:
        resized = resized_size(size, preprocess.resize)
        return max(width * height, resized[0] * resized[1])
    return width * height


def final_shape(size: tuple[int, int], preprocess: Preprocess) -> tuple[int, int, int] | None:
    """C×H×W after ``preprocess`` for an image of ``size``; None if smaller than the crop."""
    width, height = size
    if preprocess.resize is not None:
        width, height = resized_size(size, preprocess.resize)
    channels = 3 if preprocess.mode == "RGB" else 1
    crop = preprocess.center_crop
    if crop is None:
        return channels, height, width
    return None if min(width, height) < crop else (channels, crop, crop)


@contextlib.contextmanager
def quiet_bomb_warnings() -> Iterator[None]:
    """Silence Pillow's DecompressionBombWarning: our own ``max_image_pixels`` check applies."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def undecodable(path: Path, member: str, exc: BaseException) -> InvalidDataError:
    """The error for an archive member that does not decode (an image or a mask)."""
    return InvalidDataError(f"{path.name}: cannot decode {member}: {exc}", file=str(path))


def checked_shape(
    path: Path, member: str, tensor: torch.Tensor, expected: tuple[int, ...]
) -> torch.Tensor:
    """``tensor`` when it has the ``expected`` shape (the archive's first member's), else a clear
    error naming the member: every sample of a batch must have one shape."""
    if tuple(tensor.shape) != expected:
        raise InvalidDataError(
            f"{path.name}: {member} decodes to {tuple(tensor.shape)}, expected {expected}",
            file=str(path),
        )
    return tensor
