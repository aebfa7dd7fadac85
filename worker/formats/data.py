"""Calibration and evaluation data: tensor files and image archives behind one ``SampleSet``.

Formats, detected by content:

- tensor files (:mod:`.tensors`): ``.npz``, ``.safetensors`` or ``.pt`` holding ``inputs``
  (float, N×…; or several arrays named by ``input_names``) and optional ``labels`` (int, N class
  ids, or N×H×W segmentation masks).
- image archives (:mod:`.images`): ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` (also bz2/xz tars),
  in class-folder layout ``<class>/<image>`` (labeled) or flat (unlabeled), or as segmentation
  data ``images/<name>.<ext>`` + ``masks/<name>.png`` (:mod:`.masks`).

:func:`make_loader` batches a :class:`SampleSet` in exactly the order of the given indices, so
runs are deterministic; a batch is fetched in one call (tensor files index their array once).

This module sits above the readers, which never import it: what they share (``SampleSet``,
``DataLimits``, skipped entries) is :mod:`.samples`, re-exported here.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from recalib.contract import Preprocess
from recalib.errors import InvalidDataError, InvalidOptionError
from worker.formats import images, masks, tensors
from worker.formats.archives import ArchiveReader
from worker.formats.samples import DataLimits, SampleSet, log_skipped

__all__ = [  # DataLimits and SampleSet (from .samples) are imported from here across the worker
    "DataLimits",
    "SampleSet",
    "check_labels",
    "check_masks",
    "make_loader",
    "open_samples",
]

_DEFAULT_LIMITS = DataLimits()  # frozen: one shared default is safe


def open_samples(
    path: Path | str,
    *,
    preprocess: Preprocess | None = None,
    limits: DataLimits = _DEFAULT_LIMITS,
    work_dir: Path | None = None,
    input_names: Sequence[str] = ("inputs",),
) -> SampleSet:
    """Open a data file of any supported format (see the module docstring).

    Args:
        path: the data file.
        preprocess: image preprocessing (image archives only; default: RGB, no resize/crop).
        limits: archive safety limits (``max_archive_bytes`` also bounds an ``.npz``'s arrays).
        work_dir: where a compressed tar's image bytes are spooled (an anonymous temporary file,
            default the system temp dir); nothing is ever extracted by member name.
        input_names: the arrays of a tensor file fed to the model (``options.input_names``);
            an image archive holds one input, so it takes one name only.

    Raises:
        InvalidDataError: naming the file and the problem (missing/ill-shaped arrays, bad dtypes,
            non-finite values, bad labels, no images, differing image sizes).
        ArchiveRejectedError: an archive breaks a safety limit.
        UnsafePickleError: a ``.pt`` data file that would need a full unpickle.
    """
    path = Path(path)
    kind = _detect(path)
    samples: SampleSet
    if kind in ("npz", "safetensors", "pt"):
        samples = tensors.open_tensor_file(path, kind, tuple(input_names), limits)
    elif len(input_names) > 1:
        raise InvalidOptionError(
            f"{path.name} is an image archive, which holds one input per sample, but "
            f"input_names lists {len(input_names)} ({list(input_names)}); give the inputs as "
            "arrays of a tensor file (.npz, .safetensors, .pt)",
            field="options.input_names",
        )
    else:
        preprocess = preprocess or images.DEFAULT_PREPROCESS
        samples = _open_image_archive(path, kind, preprocess, limits, work_dir)
    log_skipped(samples)
    return samples


def _open_image_archive(
    path: Path, kind: str, preprocess: Preprocess, limits: DataLimits, work_dir: Path | None
) -> images.ImageSamples:
    """Scan an archive (safety checks, image headers), then build the samples of the layout its
    folders show (segmentation: :mod:`.masks`; class folders or flat: :mod:`.images`); nothing
    is decoded."""
    images.check_resize(preprocess, limits)
    reader = ArchiveReader(path, kind, limits, work_dir)
    try:
        scan = images.scan_archive(reader, preprocess, limits)
        layout = images.archive_layout(path, scan)
        if layout.segmentation:
            return masks.segmentation_samples(path, reader, scan, layout, preprocess, limits)
        return images.folder_samples(path, reader, scan, layout, preprocess, limits)
    except BaseException:
        reader.close()
        raise


def _detect(path: Path) -> str:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        raise InvalidDataError(f"{path.name}: cannot read: {exc}", file=str(path)) from exc
    if size == 0:
        raise InvalidDataError(f"{path.name}: the data file is empty", file=str(path))
    if head.startswith(b"PK"):
        return _zip_kind(path)
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")) or head[257:262] == b"ustar":
        return "tar"
    if head[:1] == b"\x80":
        return "pt"
    raise InvalidDataError(
        f"{path.name}: not a recognized data file; expected .npz, .safetensors or .pt with "
        "'inputs' (and 'labels'), or an image archive (.zip, .tar, .tar.gz)",
        file=str(path),
    )


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InvalidDataError(
            f"{path.name}: corrupt or truncated zip archive ({exc})", file=str(path)
        ) from exc
    if not names:
        what = (
            "an empty .npz: it holds no arrays; save 'inputs' (and 'labels') into it"
            if path.suffix.lower() == ".npz"
            else "the zip archive is empty: no arrays and no images in it"
        )
        raise InvalidDataError(f"{path.name}: {what}", file=str(path))
    if all(name.endswith(".npy") for name in names):
        return "npz"
    roots = {name.split("/", 1)[0] for name in names}
    records = {name.split("/", 1)[-1] for name in names} if len(roots) == 1 else set()
    if records & {"archive_format", "constants.pkl"} or any(r.startswith("code/") for r in records):
        raise InvalidDataError(
            f"{path.name} is a model (torch.export or TorchScript archive), not data; pass it as "
            "the model and give .npz/.safetensors/.pt tensors or an image archive as data",
            file=str(path),
        )
    if len(roots) == 1 and any(name.endswith("/data.pkl") for name in names):
        return "pt"
    return "zip"


class _Batches(Dataset):
    """Batch ``k`` of a loader: the ``k``-th chunk of the index list, fetched in one call."""

    def __init__(self, samples: SampleSet, indices: Sequence[int], batch_size: int) -> None:
        self.samples = samples
        starts = range(0, len(indices), batch_size)
        self.chunks = [list(indices[i : i + batch_size]) for i in starts]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[Any, torch.Tensor]:
        return self.samples.get_batch(self.chunks[k])


def make_loader(
    samples: SampleSet,
    *,
    indices: Sequence[int] | None,
    batch_size: int,
    pin_memory: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A loader of ``(inputs float32, labels int64)`` batches in the order of ``indices``
    (inputs: a dict of tensors with several ``input_names``).

    Args:
        samples: the data set.
        indices: sample indices in the wanted order (None: all, in file order).
        batch_size: samples per batch; the last batch may be smaller.
        pin_memory: pin batches for faster host-to-GPU copies.
        num_workers: worker processes decoding batches (0: in this process).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    order = list(range(samples.num_samples)) if indices is None else [int(i) for i in indices]
    return DataLoader(
        _Batches(samples, order, batch_size),
        batch_size=None,
        shuffle=False,
        pin_memory=pin_memory,
        num_workers=num_workers,
    )


def check_labels(samples: SampleSet, num_classes: int) -> None:
    """Check every label lies in ``[0, num_classes)``.

    Raises:
        InvalidDataError: naming the file, the first bad label and its sample index.
    """
    if samples.label_kind != "class":
        return  # unlabeled, or masks (check_masks)
    labels = samples.labels()
    if labels is None or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise InvalidDataError(
            f"{Path(samples.path).name}: label {int(labels[i])} of sample {i} is outside the "
            f"model's {num_classes} classes (0..{num_classes - 1}); "
            f"{len(bad)} labels are out of range",
            file=str(samples.path),
        )


MASK_CHECK_CHUNK = 64
"""Masks decoded at a time while :func:`check_masks` scans a data set."""


def check_masks(samples: SampleSet, num_classes: int, ignore_index: int) -> None:
    """Check every mask value lies in ``[0, num_classes)`` or is ``ignore_index``.

    Raises:
        InvalidDataError: naming the file, the first bad value and its sample index.
    """
    if samples.label_kind != "mask":
        return
    bad_count, first = 0, None
    for start in range(0, samples.num_samples, MASK_CHECK_CHUNK):
        indices = list(range(start, min(start + MASK_CHECK_CHUNK, samples.num_samples)))
        masks = samples.get_labels(indices)
        bad = ((masks < 0) | (masks >= num_classes)) & (masks != ignore_index)
        if bool(bad.any()):
            per_sample = bad.flatten(1).any(dim=1)
            bad_count += int(per_sample.sum())
            if first is None:
                i = int(per_sample.nonzero()[0])
                first = (start + i, int(masks[i][bad[i]][0]))
    if first is not None:
        sample, value = first
        raise InvalidDataError(
            f"{Path(samples.path).name}: mask value {value} in sample {sample} is outside the "
            f"model's {num_classes} classes (0..{num_classes - 1}) and is not ignore_index "
            f"{ignore_index}; {bad_count} masks hold such values",
            file=str(samples.path),
        )
