"""What every data reader returns and obeys: :class:`SampleSet`, :class:`DataLimits`, and the
record of entries a reader left out (:class:`SkippedEntries`, logged by :func:`log_skipped`).

The readers (:mod:`.tensors`, :mod:`.archives`, :mod:`.images`, :mod:`.masks`) build on this
module and :mod:`.data` picks one by the file's content; this module imports none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from recalib import defaults

logger = logging.getLogger(__name__)

MAX_SKIPPED_EXAMPLES = 20
"""Skipped entries named (with the reason) per data set; all of them are counted."""


@dataclass(frozen=True)
class DataLimits:
    """Safety limits for image archives and ``.npz`` files (the operator's settings; defaults
    for the CLI).

    Args:
        max_archive_members: most entries (files, folders, links) an archive may list.
        max_archive_bytes: most declared uncompressed bytes of all its members together (of an
            ``.npz``: of the arrays it is read for, as their ``.npy`` headers declare them).
        max_image_pixels: largest image (width × height) decoded; larger ones are skipped.
    """

    max_archive_members: int = defaults.MAX_ARCHIVE_MEMBERS
    max_archive_bytes: int = defaults.MAX_ARCHIVE_BYTES
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS


@dataclass
class SkippedEntries:
    """Entries of a data file left out while it was read: all counted, the first
    :data:`MAX_SKIPPED_EXAMPLES` named as ``"<entry>: <reason>"``."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, name: str, reason: str) -> None:
        """Count one entry left out and, while there is room, name it with the reason."""
        self.count += 1
        if len(self.examples) < MAX_SKIPPED_EXAMPLES:
            self.examples.append(f"{name}: {reason}")


@dataclass
class SampleSet(Dataset):
    """An indexable data set of ``(input float32 tensor, label int)``; label -1 when unlabeled.

    ``skipped_entries``/``skipped_examples`` count and name (≤ 20) archive entries left out.
    ``label_shape`` is ``()`` for class ids and ``(H, W)`` for segmentation masks;
    ``input_names`` the arrays each sample's inputs come from (several: batches of inputs are
    dicts name → tensor, in this order).
    """

    path: Path
    has_labels: bool
    num_samples: int
    sample_shape: tuple[int, ...]
    skipped_entries: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    label_shape: tuple[int, ...] = ()
    input_names: tuple[str, ...] = ("inputs",)

    @property
    def label_kind(self) -> Literal["class", "mask"] | None:
        """``class`` (one id per sample), ``mask`` (N×H×W) or None (unlabeled)."""
        if not self.has_labels:
            return None
        return "mask" if self.label_shape else "class"

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range 0..{self.num_samples - 1}")
        inputs, labels = self.get_batch([i])
        return inputs[0], int(labels[0])

    def get_batch(self, indices: Sequence[int]) -> tuple[Any, torch.Tensor]:
        """Inputs (float32, ``len(indices)×sample_shape``; a dict name → tensor with several
        ``input_names``) and labels (int64, -1 if unlabeled; masks ``len(indices)×H×W``)."""
        raise NotImplementedError

    def get_labels(self, indices: Sequence[int]) -> torch.Tensor:
        """The labels of ``indices`` (int64) without decoding any input; -1 when unlabeled."""
        return self.get_batch(indices)[1]

    def labels(self) -> torch.Tensor | None:
        """All class-id labels (int64) without decoding any input, or None when unlabeled (or
        masks: read those in chunks with :meth:`get_labels`)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (image archives); the set is unusable afterwards."""


def log_skipped(samples: SampleSet) -> None:
    """Log, once per data file, the entries its reader left out (nothing when none were).

    The only place skipped entries are logged: :func:`worker.formats.data.open_samples` calls it
    for every set it opens; the readers only count them (:class:`SkippedEntries`).
    """
    if samples.skipped_entries:
        logger.warning(
            "%s: skipped %d entries, e.g. %s",
            Path(samples.path).name,
            samples.skipped_entries,
            "; ".join(samples.skipped_examples[:3]),
        )
