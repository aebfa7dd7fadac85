"""Loading a model in any supported format and saving it back in the same format.

Formats, detected by content (the extension is only a hint):

- ``pt2``: a ``torch.export.save`` archive (zip holding ``archive_format`` = ``pt2``).
- ``torchscript``: a ``torch.jit.save`` archive (zip holding ``constants.pkl`` or ``code/``).
- ``safetensors`` / ``pt``: a state_dict (safetensors header / ``torch.save`` file), plus ``arch``.
- ``module``: a whole pickled ``nn.Module`` in a ``torch.save`` file. Detected because the
  weights-only load refuses it (never by unpickling); loaded only with ``allow_unsafe_pickle``.
- ``onnx``: an ONNX ``ModelProto`` (:mod:`recalib.files.onnx_sniff`), run by ONNX Runtime as a
  :class:`worker.onnx.module.OnnxModule` (the ``onnx`` extra); saved back as ``.onnx`` with only
  its BN running statistics changed.

:meth:`LoadedModel.save` writes ``<stem>.recalibrated<ext>`` (the input's extension) with the
module's current statistics, in the input's format and container.

:func:`read_model` is the one way a model is loaded, whoever runs the job (``recalib run``, a
worker): always from its file, in the job's own sandboxed process.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from recalib import defaults
from recalib.checksums import sha256_of
from recalib.contract import Artifact
from recalib.errors import InvalidModelError, InvalidOptionError, UnsafePickleError
from recalib.files.onnx_sniff import SNIFF_BYTES, looks_like_onnx
from worker.formats import export_program, state_dict, torchscript
from worker.formats.pickle_safety import load_weights_only

logger = logging.getLogger(__name__)

ModelFormat = Literal["pt2", "torchscript", "safetensors", "pt", "module", "onnx"]
_Kind = Literal["pt2", "torchscript", "torch_save", "safetensors", "onnx"]
_DEFAULT_EXT = {
    "pt2": ".pt2",
    "torchscript": ".pt",
    "safetensors": ".safetensors",
    "pt": ".pt",
    "onnx": ".onnx",
}
_MAX_RATIO = 1000  # zip members expanding more than this (and over 64 MiB) are refused
_MAX_HEADER_BYTES = 100 * 1024**2


@dataclass
class LoadedModel:
    """A model ready for the engine: ``module`` in eval mode on CPU, plus how to save it back."""

    module: nn.Module
    format: ModelFormat
    source_path: Path
    program: torch.export.ExportedProgram | None = field(default=None, repr=False)
    state_dtypes: dict[str, torch.dtype] = field(default_factory=dict, repr=False)
    metadata: dict[str, str] | None = field(default=None, repr=False)

    def save(self, out_dir: Path) -> Artifact:
        """Write the current statistics as ``<stem>.recalibrated<ext>`` in ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ext = self.source_path.suffix or _DEFAULT_EXT.get(self.format, ".pt")
        out_path = out_dir / f"{self.source_path.stem}.recalibrated{ext}"
        partial = out_dir / f".partial-{out_path.stem}{ext}"  # torch.export wants the suffix
        try:
            self._write(partial)
            os.replace(partial, out_path)
        finally:
            partial.unlink(missing_ok=True)
        return artifact(out_path, "pt" if self.format == "module" else self.format)

    def _write(self, path: Path) -> None:
        if self.format == "onnx":
            import onnx

            onnx.save_model(self.module.proto, str(path))  # type: ignore[union-attr,arg-type]
        elif self.format == "pt2" and self.program is not None:
            export_program.save_program(self.program, self.module, path)
        elif self.format == "torchscript":
            torchscript.save_torchscript(self.module, path)  # type: ignore[arg-type]
        elif self.format in ("safetensors", "pt"):
            container: state_dict.Container = "pt" if self.format == "pt" else "safetensors"
            state_dict.save_state_dict(
                self.module, self.state_dtypes, container, path, self.metadata
            )
        else:
            torch.save(self.module, path)


def artifact(
    path: Path, format: Literal["pt2", "torchscript", "safetensors", "pt", "onnx"]
) -> Artifact:
    """The :class:`Artifact` record (name, sha256, size) of a written file."""
    return Artifact(
        file=path.name, format=format, sha256=sha256_of(path), bytes=path.stat().st_size
    )


def read_model(
    path: Path | str,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | None = None,
    allow_unsafe_pickle: bool = False,
    arch_allowlist: Sequence[str] = defaults.ARCH_ALLOWLIST,
) -> LoadedModel:
    """Load a model file of any supported format (see the module docstring).

    Args:
        path: the model file.
        arch: ``"module:callable"`` building the model, for state_dict files only.
        arch_kwargs: JSON-able keyword arguments of ``arch``.
        allow_unsafe_pickle: the operator's opt-in to unpickle whole-module ``.pt`` files.
        arch_allowlist: module prefixes ``arch`` may come from.

    Raises:
        InvalidModelError: unreadable, corrupt or tampered file, a state_dict that does not fit,
            or ``arch`` code that raised while building the model or loading the state_dict.
        UnsafePickleError: the file needs a full unpickle and the caller did not opt in.
        ArchitectureNotAllowedError / InvalidOptionError: a bad ``arch`` / ``arch_kwargs``.
    """
    path = Path(path)
    kind, archive, root = _detect(path)
    if arch is not None and kind in ("pt2", "torchscript", "onnx"):
        raise InvalidOptionError(
            f"arch is for state_dict files, and {path.name} is a {kind} model: drop arch",
            field="arch",
        )
    if kind == "pt2" and archive is not None and root is not None:
        with archive:
            program = export_program.load_program(
                path, archive, root, allow_unsafe_pickle=allow_unsafe_pickle
            )
        return LoadedModel(export_program.to_module(program, path), "pt2", path, program=program)
    if archive is not None:
        archive.close()
    if kind == "onnx":
        return _read_onnx(path)
    if kind == "torchscript":
        return LoadedModel(torchscript.load_torchscript(path), "torchscript", path)
    if kind == "safetensors":
        tensors, metadata = state_dict.read_safetensors(path)
        return _from_state_dict(
            path, tensors, "safetensors", arch, arch_kwargs, arch_allowlist, metadata
        )
    obj = _load_torch_save(path, allow_unsafe_pickle)
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise InvalidOptionError(f"{path.name} holds a whole module: drop arch", field="arch")
        return LoadedModel(obj.to("cpu").eval(), "module", path)
    tensors = state_dict.unwrap_checkpoint(obj, path)
    return _from_state_dict(path, tensors, "pt", arch, arch_kwargs, arch_allowlist, None)


def _read_onnx(path: Path) -> LoadedModel:
    """An ONNX file as an :class:`~worker.onnx.module.OnnxModule` (external data refused: an
    uploaded model is one file; see :func:`worker.onnx.read_onnx`)."""
    try:
        from worker.onnx import read_onnx
        from worker.onnx.module import OnnxModule
    except ImportError as exc:
        raise InvalidModelError(
            f"{path.name} is an ONNX model, and this worker lacks ONNX support (install "
            "recalib[onnx]: onnx, onnxruntime)",
            file=str(path),
        ) from exc
    return LoadedModel(OnnxModule(read_onnx(path), path.name), "onnx", path)


def _load_torch_save(path: Path, allow_unsafe_pickle: bool) -> Any:
    try:
        return load_weights_only(path)
    except UnsafePickleError:
        if not allow_unsafe_pickle:
            raise
    logger.warning("%s: unpickling with weights_only=False (operator opted in)", path.name)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InvalidModelError(f"{path.name}: cannot unpickle: {exc}", file=str(path)) from exc


def _from_state_dict(
    path: Path,
    tensors: dict[str, torch.Tensor],
    format: Literal["safetensors", "pt"],
    arch: str | None,
    arch_kwargs: Mapping[str, object] | None,
    allowlist: Sequence[str],
    metadata: dict[str, str] | None,
) -> LoadedModel:
    if arch is None:
        raise InvalidModelError(
            f"{path.name} is a state_dict (weights without the architecture): pass arch as "
            "'module:callable' (e.g. --arch torchvision.models:resnet18) and arch_kwargs",
            file=str(path),
        )
    model = state_dict.build_model(arch, arch_kwargs or {}, allowlist)
    applied = state_dict.apply_state_dict(model, tensors, path, arch)
    with state_dict.arch_code(arch, "failed to move to the CPU in eval mode"):
        module = model.to("cpu").eval()
    return LoadedModel(
        module,
        format,
        path,
        state_dtypes={k: v.dtype for k, v in applied.items()},
        metadata=metadata,
    )


def _detect(path: Path) -> tuple[_Kind, zipfile.ZipFile | None, str | None]:
    """The kind of model file, by content; for zips also the open archive and its root folder."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as exc:
        raise InvalidModelError(
            f"{path.name}: cannot read the model file: {exc}", file=str(path)
        ) from exc
    if size == 0:
        raise InvalidModelError(f"{path.name}: the model file is empty", file=str(path))
    if head.startswith(b"PK"):
        return _detect_zip(path)
    if len(head) >= 9 and head[8:9] == b"{":
        (header_bytes,) = struct.unpack("<Q", head[:8])
        if header_bytes < min(size, _MAX_HEADER_BYTES):
            return "safetensors", None, None
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch.save's legacy (non-zip) format
        return "torch_save", None, None
    if looks_like_onnx(head):
        return "onnx", None, None
    raise InvalidModelError(
        f"{path.name}: not a recognized model file; expected a torch.export .pt2, a TorchScript "
        "archive, a .safetensors state_dict, a torch.save .pt or an ONNX .onnx model",
        file=str(path),
    )


def _detect_zip(path: Path) -> tuple[_Kind, zipfile.ZipFile, str]:
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InvalidModelError(
            f"{path.name}: corrupt or truncated zip archive ({exc})", file=str(path)
        ) from exc
    roots = {info.filename.split("/", 1)[0] for info in infos}
    for info in infos:
        if info.file_size > 64 * 1024**2 and info.file_size > _MAX_RATIO * max(
            info.compress_size, 1
        ):
            archive.close()
            raise InvalidModelError(
                f"{path.name}: member {info.filename} expands {info.compress_size} bytes to "
                f"{info.file_size} (compression bomb?)",
                file=str(path),
            )
    root = roots.pop() if len(roots) == 1 else ""
    records = {info.filename.split("/", 1)[-1] for info in infos}
    is_pt2 = root and "archive_format" in records
    if is_pt2 and archive.read(f"{root}/archive_format").strip() == b"pt2":
        return "pt2", archive, root
    if root and ("constants.pkl" in records or any(r.startswith("code/") for r in records)):
        return "torchscript", archive, root
    if root and "data.pkl" in records:
        return "torch_save", archive, root
    archive.close()
    raise InvalidModelError(
        f"{path.name}: a zip archive, but not a torch.export .pt2, a TorchScript archive or a "
        "torch.save file",
        file=str(path),
    )
