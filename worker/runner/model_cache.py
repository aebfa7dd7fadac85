"""Models loaded by earlier jobs of a warm runner, so that a repeat job skips loading and vetting.

Keyed by the model file's sha256 plus everything else that decides what loading builds (``arch``,
``arch_kwargs``, the pickle opt-in, the arch allowlist). The cache keeps a pristine copy of each
:class:`~worker.formats.models.LoadedModel` on the CPU and never hands it out: every job gets a
``copy.deepcopy`` of it (module and ``.pt2`` program copied together, so the tensors they share
stay shared in the copy), so a job can change its model in place (recalibration, the program's
state written back when saving) without an earlier job's changes ever reaching a later job.

Bounded in bytes (the unique tensor storages of the module and program): least recently used
entries go first; a model larger than the whole bound is not cached. Between jobs the runner
calls :meth:`ModelCache.prepare_spare`: the most recently used model gets one copy made ahead
(counted in the bound, dropped first), so that a repeat job takes it instead of copying then.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from recalib import defaults
from worker.formats.models import LoadedModel, read_model

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    loaded: LoadedModel
    size_bytes: int
    spare: LoadedModel | None = None  # a fresh copy made ahead, between jobs


class ModelCache:
    """An LRU of loaded models, at most ``max_bytes`` of tensors (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def size_bytes(self) -> int:
        """Bytes held: each entry once, twice with its spare copy."""
        return sum(e.size_bytes * (2 if e.spare else 1) for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def load(
        self,
        path: Path | str,
        *,
        sha256: str | None = None,
        arch: str | None = None,
        arch_kwargs: Mapping[str, object] | None = None,
        allow_unsafe_pickle: bool = False,
        arch_allowlist: Sequence[str] = defaults.ARCH_ALLOWLIST,
    ) -> LoadedModel:
        """:func:`worker.formats.models.read_model`'s result for ``path``: a fresh copy of the
        cached model when this content was loaded before with the same arguments.

        ``sha256`` is the file's content hash when the caller knows it (the upload's record);
        otherwise the file is hashed here.
        """
        path = Path(path)
        key = (
            sha256 or file_sha256(path),
            arch,
            json.dumps(arch_kwargs or {}, sort_keys=True),
            allow_unsafe_pickle,
            tuple(arch_allowlist),
        )
        entry = self._entries.get(key) if self.max_bytes > 0 else None
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            logger.info("model %s: from the runner's cache", path.name)
            copied, entry.spare = entry.spare or fresh_copy(entry.loaded), None
            return replace(copied, source_path=path)
        self.misses += 1
        loaded = read_model(
            path,
            arch=arch,
            arch_kwargs=arch_kwargs,
            allow_unsafe_pickle=allow_unsafe_pickle,
            arch_allowlist=arch_allowlist,
        )
        if self.max_bytes > 0:
            self._put(key, loaded)
        return fresh_copy(loaded) if key in self._entries else loaded

    def prepare_spare(self) -> None:
        """Copy the most recently used model ahead of its next job, if the bound has room."""
        if not self._entries:
            return
        entry = next(reversed(self._entries.values()))
        if entry.spare is None and self.size_bytes + entry.size_bytes <= self.max_bytes:
            entry.spare = fresh_copy(entry.loaded)

    def clear(self) -> None:
        self._entries.clear()

    def _put(self, key: tuple[Any, ...], loaded: LoadedModel) -> None:
        size = model_bytes(loaded)
        if size > self.max_bytes:
            logger.info("model of %d bytes not cached: over RECALIB_MODEL_CACHE_BYTES", size)
            return
        for entry in self._entries.values():  # spares go before any model does
            entry.spare = None
        while self._entries and self.size_bytes + size > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = _Entry(loaded, size)


def fresh_copy(loaded: LoadedModel) -> LoadedModel:
    """A deep copy of ``loaded`` (module, program, dtypes, metadata) sharing nothing with it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree LeafSpec deprecation
        return copy.deepcopy(loaded)


def model_bytes(loaded: LoadedModel) -> int:
    """Bytes of the distinct tensor storages a loaded model holds (module and program)."""
    tensors: list[torch.Tensor] = [*loaded.module.state_dict(keep_vars=True).values()]
    if loaded.program is not None:
        tensors += [*loaded.program.state_dict.values(), *loaded.program.constants.values()]
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
