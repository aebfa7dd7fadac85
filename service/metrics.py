"""Prometheus metrics of the service, read from Redis at scrape time (a custom collector).

Job gauges and the duration histogram come from the job store, so every API process reports the
same numbers; ``recalib_upload_bytes_total`` counts what this process committed. When Redis does
not answer, ``recalib_redis_up`` is 0 and the job metrics are left out of that scrape.

One job's own figures (``GET /v1/jobs/{id}/metrics``, :func:`render_job_metrics`) come from its
report: a drift job's score, threshold, recommendation and per-layer scores; a recalibration's
top-1 / mean IoU before and after. Labelled by job id and kind, so a scraper or a Pushgateway
step can keep them apart.
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

from recalib.contract import JobRecord, JobStatus, Report
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


class JobCollector(Collector):
    """The figures of one succeeded job's report, as metrics labelled ``job_id`` and ``kind``."""

    def __init__(self, job_id: str, report: Report) -> None:
        self.job_id, self.report = job_id, report

    def collect(self) -> Iterator[Metric]:
        labels = ["job_id", "kind"]
        values = [self.job_id, self.report.kind.value]
        total = GaugeMetricFamily(
            "recalib_job_seconds", "Run time of the job's phases in total, seconds.", labels=labels
        )
        total.add_metric(values, self.report.timings_s.get("total", 0.0))
        yield total
        drift = self.report.drift
        if drift is not None:
            for name, help_text, value in (
                ("score", "Drift score: mean symmetric KL per BN channel, nats.", drift.score),
                ("threshold", "Drift score above which recalibration is recommended.",
                 drift.threshold),
                ("recommend_recalibration", "1 when the drift check recommends recalibrating.",
                 float(drift.recommend_recalibration)),
                ("samples", "Samples the drift check read.", float(drift.samples)),
            ):  # fmt: skip
                gauge = GaugeMetricFamily(f"recalib_drift_{name}", help_text, labels=labels)
                gauge.add_metric(values, value)
                yield gauge
            layers = GaugeMetricFamily(
                "recalib_drift_layer_score",
                "Drift score of one BN layer, nats.",
                labels=[*labels, "layer"],
            )
            for layer in drift.layers:
                layers.add_metric([*values, layer.name], layer.score)
            yield layers
        for key, metric in (("top1", "top1"), ("mean_iou", "mean_iou")):
            measured = [
                (phase, getattr(m, key))
                for phase, m in (("before", self.report.before), ("after", self.report.after))
                if m is not None and getattr(m, key) is not None
            ]
            if measured:
                gauge = GaugeMetricFamily(
                    f"recalib_job_{metric}",
                    f"{metric} of the evaluation, before and after recalibration.",
                    labels=[*labels, "phase"],
                )
                for phase, value in measured:
                    gauge.add_metric([*values, phase], value)
                yield gauge


def render_job_metrics(record: JobRecord) -> bytes:
    """Prometheus text of a succeeded job's figures (the caller checks that it succeeded)."""
    if record.result is None:
        raise ValueError(f"job {record.id} has no report")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(record.id, record.result))
    return generate_latest(registry)


def metrics_registry(collector: ServiceCollector) -> CollectorRegistry:
    """A registry of its own per app (tests build several apps in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
