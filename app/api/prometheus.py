"""GET /metrics in the Prometheus text format, correct with any number of API and worker processes.

Nothing is counted in this process's memory: gauges are read from the database at scrape time,
job counters and histograms are derived from the event roll-ups (app.domain.stats), and the one
figure only the API sees, the request time of POST /jobs/, is kept in Redis (app.telemetry).

Unauthenticated on purpose: Prometheus scrapers rarely carry a JWT, and the page holds only
aggregate numbers (no job ids or commands; owners appear only as labels of the fair-share figures).
Restrict it at the network if that matters.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from flask import Response, current_app, g, request
from flask.views import MethodView
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from app.api import Blueprint
from app.api.context import session, settings
from app.domain import counters, nodes, stats
from app.domain.states import ALL_STATES, JobStatus
from app.models import NODE_STATES
from app.telemetry import SUBMIT_LATENCY_BUCKETS, RedisHistogram, redis_client
from config import Settings

log = logging.getLogger(__name__)

blp = Blueprint("prometheus", __name__, url_prefix="", description="Prometheus metrics (text format, no token)")

SUBMIT_RULE = "/api/v1/jobs/"
# Prometheus buckets are powers of two: each is a boundary of the roll-ups' 1/8-octave buckets,
# so the cumulative counts are exact.
DISPATCH_BOUNDS_MS = tuple(2.0**k for k in range(0, 21))  # 1 ms .. 17.5 min
EXECUTION_BOUNDS_S = tuple(2.0**k for k in range(-4, 17))  # 62.5 ms .. 18 h
OUTCOMES = {"succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled", "pending": "retried"}


def submit_histogram() -> RedisHistogram | None:
    """This app's handle on the shared submit-latency histogram (None without Redis)."""
    extensions = current_app.extensions
    if "jobservice.submit_histogram" not in extensions:
        url = settings().redis_url
        extensions["jobservice.submit_histogram"] = (
            RedisHistogram(redis_client(url), "submit_latency_seconds", SUBMIT_LATENCY_BUCKETS) if url else None
        )
    return extensions["jobservice.submit_histogram"]


@blp.before_app_request
def _start_clock() -> None:
    g.setdefault("metrics_started", time.perf_counter())


@blp.after_app_request
def _observe_submit(response: Response) -> Response:
    rule = request.url_rule
    if request.method == "POST" and rule is not None and rule.rule == SUBMIT_RULE and response.status_code == 201:
        histogram = submit_histogram()
        if histogram is not None:
            # From the first before_request hook (the access log's clock) when there is one.
            started = g.get("request_started", g.get("metrics_started", time.perf_counter()))
            histogram.observe(time.perf_counter() - started)
    return response


@blp.route("/metrics")
class PrometheusMetrics(MethodView):
    @blp.response(200, content_type=CONTENT_TYPE_LATEST)
    def get(self) -> Response:
        """Queue depth, jobs by state, latency histograms, executions, node heartbeats, GPUs"""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServiceCollector(session(), settings(), submit_histogram()))
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class ServiceCollector(Collector):
    """Reads everything at scrape time; built per scrape with that request's session."""

    def __init__(self, db: Session, config: Settings, submit: RedisHistogram | None) -> None:
        self.db = db
        self.config = config
        self.submit = submit

    def collect(self) -> Iterator[Metric]:
        yield from self._queues()
        yield from self._job_rollups()
        yield from self._submit_latency()
        yield from self._fleet()
        yield from self._pools()
        yield from self._fairness()

    def _queues(self) -> Iterator[Metric]:
        overview = stats.queues_overview(self.db, self.config)
        gauges = {
            "depth": GaugeMetricFamily("jobservice_queue_depth", "Pending jobs per queue", labels=["queue"]),
            "processing": GaugeMetricFamily("jobservice_queue_processing", "Running jobs per queue", labels=["queue"]),
            "queued": GaugeMetricFamily("jobservice_queue_queued", "Admitted jobs waiting for their worker", labels=["queue"]),
            "max_concurrency": GaugeMetricFamily("jobservice_queue_max_concurrency", "Configured max_concurrency", labels=["queue"]),
            "oldest_job_age_seconds": GaugeMetricFamily(
                "jobservice_queue_oldest_job_age_seconds", "Age of the longest-waiting pending job (0 when none)", labels=["queue"]
            ),
        }
        for queue in overview.queues:
            for attribute, gauge in gauges.items():
                gauge.add_metric([queue.name], float(getattr(queue, attribute) or 0))
        yield from gauges.values()
        by_state = GaugeMetricFamily("jobservice_jobs", "Jobs in each state, per queue", labels=["queue", "state"])
        counts = counters.counts_by_queue_and_status(self.db)
        names = [q.name for q in self.config.queues] + sorted(set(counts) - {q.name for q in self.config.queues})
        for name in names:
            for state in ALL_STATES:
                by_state.add_metric([name, state], float(counts.get(name, {}).get(state, 0)))
        yield by_state

    def _job_rollups(self) -> Iterator[Metric]:
        rollups = stats.all_time_rollups(self.db)
        dispatch = HistogramMetricFamily(
            "jobservice_dispatch_latency_seconds", "Submit to first running, per job", labels=["queue"]
        )
        execution = HistogramMetricFamily(
            "jobservice_execution_duration_seconds", "Running to the end of the attempt", labels=["queue"]
        )
        executions = CounterMetricFamily("jobservice_executions", "Attempts that ended, by outcome", labels=["queue", "outcome"])
        submitted = CounterMetricFamily("jobservice_jobs_submitted", "Jobs submitted", labels=["queue"])
        finished = CounterMetricFamily("jobservice_jobs_finished", "Jobs that reached a final state", labels=["queue", "status"])
        for queue in sorted(rollups):
            rollup = rollups[queue]
            d = rollup.merged("dispatch")
            dispatch.add_metric([queue], _buckets(d, DISPATCH_BOUNDS_MS, scale=1000.0), sum_value=d.total / 1000.0)
            e = rollup.merged("execution")
            execution.add_metric([queue], _buckets(e, EXECUTION_BOUNDS_S), sum_value=e.total)
            for label, outcome in OUTCOMES.items():
                executions.add_metric([queue, outcome], float(rollup.count("execution", (label,))))
            submitted.add_metric([queue], float(rollup.count("submitted")))
            for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
                finished.add_metric([queue, status.value], float(rollup.count("finished", (status.value,))))
        yield from (dispatch, execution, executions, submitted, finished)

    def _submit_latency(self) -> Iterator[Metric]:
        if self.submit is None:
            return
        try:
            buckets, total, _count = self.submit.read()
        except redis.RedisError as exc:
            log.warning("submit latency histogram unavailable: %s", exc)  # the rest of the page still answers
            return
        histogram = HistogramMetricFamily("jobservice_submit_latency_seconds", "API request time of POST /jobs/ (201 only)")
        histogram.add_metric([], buckets, sum_value=total)
        yield histogram

    def _fleet(self) -> Iterator[Metric]:
        age = GaugeMetricFamily("jobservice_node_heartbeat_age_seconds", "Seconds since the node's last heartbeat", labels=["cluster", "node"])
        alive = GaugeMetricFamily("jobservice_node_alive", "1 when the node heartbeated within NODE_LEASE_SECONDS", labels=["cluster", "node"])
        for node in stats.node_health(self.db, self.config):
            age.add_metric([node.cluster, node.name], node.heartbeat_age_seconds)
            alive.add_metric([node.cluster, node.name], 1.0 if node.alive else 0.0)
        gpus = GaugeMetricFamily("jobservice_gpus", "GPUs of live nodes, held by admitted jobs or free", labels=["cluster", "state"])
        for cluster in stats.gpus_by_cluster(self.db, self.config):
            gpus.add_metric([cluster.cluster, "used"], float(cluster.used))
            gpus.add_metric([cluster.cluster, "free"], float(cluster.free))
        state = GaugeMetricFamily(
            "jobservice_node_state", "1 for the node's state (ready, cordoned, draining), 0 for the others", labels=["cluster", "node", "state"]
        )
        for (cluster_name, node_name), current in sorted(nodes.node_states(self.db).items()):
            for candidate in NODE_STATES:
                state.add_metric([cluster_name, node_name, candidate], 1.0 if candidate == current else 0.0)
        yield from (age, alive, gpus, state)


    def _pools(self) -> Iterator[Metric]:
        from app.domain import pools
        from app.domain.jobs import utcnow

        families = {
            "pending_jobs": GaugeMetricFamily("jobservice_pool_pending_jobs", "Pending jobs only this worker pool can serve", labels=["pool"]),
            "pending_gpus": GaugeMetricFamily("jobservice_pool_pending_gpus", "GPUs asked by the pending jobs only this pool can serve", labels=["pool"]),
            "idle_gpus": GaugeMetricFamily("jobservice_pool_idle_gpus", "Free GPUs on the pool's live, ready nodes", labels=["pool"]),
            "gpus": GaugeMetricFamily("jobservice_pool_gpus", "All GPUs of the pool's live, ready nodes", labels=["pool"]),
            "nodes": GaugeMetricFamily("jobservice_pool_nodes", "The pool's live, ready nodes", labels=["pool"]),
        }
        for row in pools.pool_demand(self.db, self.config, utcnow()):
            for attribute, family in families.items():
                family.add_metric([row.pool], float(getattr(row, attribute)))
        yield from families.values()

    def _fairness(self) -> Iterator[Metric]:
        from app.domain import fairness
        from app.domain.jobs import utcnow

        report = fairness.report(self.db, self.config, utcnow())
        families = {
            "share": GaugeMetricFamily("jobservice_fair_share", "Owner's share: (decayed usage + held) / weight, dominant fraction", labels=["owner"]),
            "weight": GaugeMetricFamily("jobservice_fair_share_weight", "Owner's fair-share weight", labels=["owner"]),
            "gpu_seconds": GaugeMetricFamily("jobservice_fair_share_gpu_seconds", "Owner's decayed GPU-seconds", labels=["owner"]),
            "held_share": GaugeMetricFamily("jobservice_fair_share_held", "Dominant fraction of the fleet the owner holds now", labels=["owner"]),
            "pending": GaugeMetricFamily("jobservice_fair_share_backlog", "Owner's pending jobs", labels=["owner"]),
        }
        for row in report.owners:
            for attribute, family in families.items():
                family.add_metric([row.owner], float(getattr(row, attribute)))
        yield from families.values()


def _buckets(histogram: stats.Histogram, bounds: tuple[float, ...], scale: float = 1.0) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs in base units, ending with +Inf; `scale` converts the stored unit."""
    pairs: list[tuple[str, Any]] = [(repr(bound / scale), float(histogram.cumulative_below(bound))) for bound in bounds]
    pairs.append(("+Inf", float(histogram.count)))
    return pairs
