"""What the benchmark scripts share: the machine line, statistics, the results out, a big
random file and its upload streamed through the API, a process's peak RSS while a block runs."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.stack import rss_kib

CHUNK = 1024 * 1024


def machine() -> str:
    """CPU model, core count and Python version of this machine, one line."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float], digits: int | None = None) -> dict[str, Any]:
    """The values (rounded to ``digits`` when given), their median and the best (least)."""
    shown = values if digits is None else [round(v, digits) for v in values]
    return {"values": shown, "median": statistics.median(values), "best": min(values)}


def write_results(results: dict[str, Any], out: Path | None) -> None:
    """Print the results as JSON, and write them to ``out`` too when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def write_random_file(path: Path, size: int) -> str:
    """``size`` random bytes (a 16 MiB block repeated) into ``path``; their sha256, hex."""
    block = os.urandom(16 * CHUNK)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for start in range(0, size, len(block)):
            piece = block[: min(len(block), size - start)]
            fh.write(piece)
            digest.update(piece)
    return digest.hexdigest()


def upload_through_api(url: str, path: Path, size: int, timeout_s: float) -> float:
    """Seconds to stream ``path`` (``size`` bytes) into ``POST /v1/files``; the file is then
    deleted."""

    def body() -> Iterator[bytes]:
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    start = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/files",
        params={"filename": "big.bin"},
        content=body(),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        timeout=timeout_s,
    )
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    httpx.delete(f"{url}/v1/files/{response.json()['id']}").raise_for_status()
    return elapsed


class PeakRss:
    """Samples the RSS of process ``pid`` every ``interval_s`` while the block runs.

    ``idle_kib``: the RSS when made; ``peak_kib``: the highest sampled so far (at least idle);
    ``hwm_kib``: the process's VmHWM when the block ends.
    """

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.idle_kib = self.peak_kib = rss_kib(pid)[0]
        self.hwm_kib = 0
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid)[0])
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._sampler.join()
        self.hwm_kib = rss_kib(self.pid)[1]
