"""System metrics (JSON): the last 24 hours of jobs, latency and throughput (any valid token)."""
from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView

from app.api import Blueprint
from app.api.context import session
from app.api.identity import current_caller
from app.domain import preemption, stats
from app.domain.jobs import utcnow

blp = Blueprint("metrics", __name__, url_prefix="/api/v1/metrics", description="Aggregated system metrics")


class JobTotalsSchema(ma.Schema):
    total_submitted_24h = ma.fields.Integer()
    total_completed_24h = ma.fields.Integer(metadata={"description": "Jobs that succeeded"})
    total_failed_24h = ma.fields.Integer()
    success_rate = ma.fields.Float(allow_none=True, metadata={"description": "succeeded / (succeeded + failed); null when neither"})


class LatencySchema(ma.Schema):
    dispatch_p50_ms = ma.fields.Float(allow_none=True, metadata={"description": "Submit to first running"})
    dispatch_p99_ms = ma.fields.Float(allow_none=True)
    execution_p50_seconds = ma.fields.Float(allow_none=True, metadata={"description": "Running to the attempt's end"})
    execution_p99_seconds = ma.fields.Float(allow_none=True)


class ThroughputSchema(ma.Schema):
    jobs_per_second = ma.fields.Float(metadata={"description": "Jobs that succeeded or failed in the trailing minute, per second"})
    peak_jobs_per_second = ma.fields.Float(metadata={"description": "The busiest minute of the last 24 h, per second"})


class PreemptionSchema(ma.Schema):
    preemptions_24h = ma.fields.Integer(metadata={"description": "Running jobs sent back to the backlog for higher-priority work"})
    gpu_seconds_lost_24h = ma.fields.Float(metadata={"description": "GPU-seconds the preempted attempts had run"})
    by_queue = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Integer())
    by_tenant = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.Integer())


class SystemMetricsSchema(ma.Schema):
    jobs = ma.fields.Nested(JobTotalsSchema)
    latency = ma.fields.Nested(LatencySchema)
    throughput = ma.fields.Nested(ThroughputSchema)
    preemptions = ma.fields.Nested(PreemptionSchema)


@blp.route("/")
class SystemMetrics(MethodView):
    @blp.response(200, SystemMetricsSchema)
    def get(self) -> dict[str, Any]:
        """Jobs, latency, throughput and preemptions over the last 24 hours"""
        current_caller()
        metrics = stats.system_metrics(session())
        return {"jobs": metrics.jobs, "latency": metrics.latency, "throughput": metrics.throughput,
                "preemptions": preemption.stats(session(), utcnow())}
