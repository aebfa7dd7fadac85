"""A run's inputs: uploads (by file id) or URIs, materialized in the run's directory.

:class:`JobInputs` is what the worker's run uses: :meth:`JobInputs.materialize` puts each input
at ``<dir>/<role>/<name>`` (an upload from the file store; a URI fetched through the worker's
cache, :mod:`recalib.inputs.cache`, by :mod:`recalib.inputs.uri_fetch`), and
:meth:`JobInputs.annotate` records where each came from, with its sha256, in ``report.data``.
:func:`recalib.inputs.uri_fetch.check_job_uris` is admission's create-time check of the URIs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from recalib.checksums import sha256_of
from recalib.contract import InputSource, JobRecord, Report
from recalib.errors import NotFoundError
from recalib.files.store import FileStore, sanitize_filename
from recalib.inputs.cache import InputCache
from recalib.inputs.uri_fetch import FetchContext, Sink, fetch, fetch_context, models_source
from recalib.settings import Settings

logger = logging.getLogger(__name__)

ROLES = ("model", "calibration", "eval", "source_eval")
REPORT_FILE = "report.json"


def uri_filename(uri: str) -> str:
    """The file name a URI's input gets (its last path segment; the extension tells the format)."""
    return sanitize_filename(PurePosixPath(unquote(urlsplit(uri).path)).name)


class JobInputs:
    """The inputs of one run of ``record``'s job."""

    def __init__(
        self,
        files: FileStore,
        record: JobRecord,
        ctx: FetchContext,
        cache: InputCache,
    ) -> None:
        self.files, self.record, self.ctx, self.cache = files, record, ctx, cache
        self.sources: dict[str, InputSource] = {}
        self.resolved: dict[str, str] = {}  # role → models:/<name>/<version> an alias named

    def materialize(self, role: str, target_dir: Path) -> Path | None:
        """The input ``role`` under ``target_dir``; None when the job has none such."""
        request = self.record.request
        file_id, uri = getattr(request, f"{role}_file"), getattr(request, f"{role}_uri")
        if file_id is not None:
            return self._upload(role, file_id, target_dir)
        if uri is None:
            return None
        return self._fetch(role, uri, target_dir)

    def model_source(self) -> str | None:
        """Where the model came from, for the registry's lineage tags: the registered version
        (``models:/<name>/<version>``, also when an alias named it), else its URI."""
        return self.resolved.get("model") or self.record.request.model_uri

    def sha256_of(self, role: str) -> str | None:
        source = self.sources.get(role)
        return source.sha256 if source else None

    def _upload(self, role: str, file_id: str, target_dir: Path) -> Path:
        """The upload ``file_id``; from a remote store through the cache, by its sha256 (the
        download is checked against it before it is kept; a cached copy is used only while the
        upload is still in the store)."""
        stored = self.files.input_record(file_id, role, self.record.tenant)
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / Path(stored.filename).name
        remote = not self.files.storage.is_local and self.cache.enabled
        cached = self.cache.content(stored.sha256, stored.bytes) if remote else None
        if cached is not None:
            self.files.check_content(stored, role)
            _link(cached, target)
        elif not remote:
            self.files.download(stored, target, role)
        else:
            tmp = self.cache.tmp_path()
            try:
                self.files.download(stored, tmp, role)
                _check_content(tmp, stored.sha256, role, file_id)
                _link(self.cache.keep(tmp, stored.sha256), target)
            finally:
                tmp.unlink(missing_ok=True)
        self.sources[role] = InputSource(
            role=role,
            file_id=file_id,
            sha256=stored.sha256,
            bytes=stored.bytes,
            cached=cached is not None,
        )
        return target

    def _fetch(self, role: str, uri: str, target_dir: Path) -> Path:
        field = f"{role}_uri"
        target_dir.mkdir(parents=True, exist_ok=True)
        cached = self.cache.lookup(uri)
        if cached is not None and cached.bytes > self.ctx.max_bytes:
            cached = None  # the cap is lower than when it was fetched: the source decides again
        tmp = self.cache.tmp_path() if self.cache.enabled else target_dir / ".fetching"
        sink = Sink(tmp, self.ctx.max_bytes, field, uri)
        try:
            try:
                fetched = fetch(uri, field, sink, cached, self.ctx)
            finally:
                sink.close()
            target = target_dir / (sanitize_filename(fetched.filename or "") if fetched.filename
                                   else uri_filename(uri))  # fmt: skip
            if fetched.filename and fetched.validator:
                self.resolved[role] = models_source(fetched.validator)
            if fetched.not_modified and cached is not None:
                tmp.unlink(missing_ok=True)
                _link(cached.path, target)
                source = InputSource(
                    role=role, uri=uri, sha256=cached.sha256, bytes=cached.bytes, cached=True
                )
            else:
                if self.cache.enabled:
                    kept = self.cache.add(uri, fetched.validator, tmp, sink.sha256, sink.bytes)
                    _link(kept, target)
                else:
                    os.replace(tmp, target)
                source = InputSource(role=role, uri=uri, sha256=sink.sha256, bytes=sink.bytes)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.info(
            "job %s: %s %s: %d bytes, sha256 %s%s",
            self.record.id,
            field,
            uri,
            source.bytes,
            source.sha256,
            " (cached)" if source.cached else "",
        )
        self.sources[role] = source
        return target

    def annotate(self, report: Report, out_dir: Path) -> Report:
        """``report`` with its inputs' sources in ``data.sources``; ``out_dir/report.json`` is
        rewritten to match (atomically)."""
        sources = [self.sources[role] for role in ROLES if role in self.sources]
        data = report.data.model_copy(update={"sources": sources})
        report = report.model_copy(update={"data": data})
        path = out_dir / REPORT_FILE
        if path.is_file():
            tmp = path.with_name(f".{REPORT_FILE}.sources")
            tmp.write_text(report.model_dump_json(indent=2), encoding="utf-8")
            os.replace(tmp, path)
        return report


def _check_content(path: Path, sha256: str, role: str, file_id: str) -> None:
    """:class:`NotFoundError` unless ``path`` holds the content recorded at upload."""
    found = sha256_of(path)
    if found != sha256:
        raise NotFoundError(
            f"the {role} file {file_id}: its content in the store was changed outside recalib "
            f"(sha256 {found}, uploaded as {sha256}); upload it again and submit a new job",
            file=file_id,
        )


def _link(source: Path, target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def run_inputs(files: FileStore, record: JobRecord, settings: Settings) -> JobInputs:
    """The inputs of a worker's run: URIs fetched through the cache in the worker's data
    directory (``<data_dir>/cache``, at most ``RECALIB_INPUT_CACHE_BYTES``)."""
    cache = InputCache(Path(settings.data_dir) / "cache", settings.input_cache_bytes)
    return JobInputs(files, record, fetch_context(settings, files.storage), cache)
