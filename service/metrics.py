"""Prometheus metrics of the service, read from Redis at scrape time (a custom collector).

Job gauges and the duration histogram come from the job store, so every API process reports the
same numbers; ``recalib_upload_bytes_total`` counts what this process committed. When Redis does
not answer, ``recalib_redis_up`` is 0 and the job metrics are left out of that scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from recalib.contract import JobStatus
from recalib.files.store import FileStore
from recalib.jobs.job_store import JobStore
from recalib.jobs.workers import live_workers
from recalib.settings import Settings

logger = logging.getLogger(__name__)


class ServiceCollector(Collector):
    """Collects job, queue, worker and upload metrics on each scrape."""

    def __init__(
        self, conn: redis.Redis, settings: Settings, jobs: JobStore, files: FileStore
    ) -> None:
        self.conn, self.settings, self.jobs, self.files = conn, settings, jobs, files

    def collect(self) -> Iterator[Metric]:
        uploads = CounterMetricFamily(
            "recalib_upload_bytes", "Bytes of uploads committed by this API process."
        )
        uploads.add_metric([], self.files.committed_bytes)
        yield uploads
        up = GaugeMetricFamily("recalib_redis_up", "1 when Redis answered this scrape.")
        try:
            job_metrics = list(self._job_metrics())
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("metrics without job data: Redis unavailable (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from job_metrics

    def _job_metrics(self) -> Iterator[Metric]:
        counts = self.jobs.counts_by_status()
        by_status = GaugeMetricFamily("recalib_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status, 0))
        yield by_status
        depth = GaugeMetricFamily("recalib_queue_depth", "Jobs waiting in the queue.")
        depth.add_metric([], self.jobs.queue_depth())
        yield depth
        workers = live_workers(self.conn, self.settings)
        total = GaugeMetricFamily("recalib_workers_live", "Live workers (recent heartbeat).")
        total.add_metric([], len(workers))
        yield total
        live = GaugeMetricFamily("recalib_workers", "Live workers by device.", labels=["device"])
        per_device: dict[str, int] = {}
        for worker in workers:
            per_device[worker.device] = per_device.get(worker.device, 0) + 1
        for device, count in sorted(per_device.items()):
            live.add_metric([device], count)
        yield live
        buckets, sum_s, _count = self.jobs.duration_histogram()
        duration = HistogramMetricFamily(
            "recalib_job_duration_seconds", "Run time of finished jobs, seconds."
        )
        duration.add_metric([], [(_le(le), count) for le, count in buckets], sum_value=sum_s)
        yield duration


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def metrics_registry(collector: ServiceCollector) -> CollectorRegistry:
    """A registry of its own per app (tests build several apps in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
