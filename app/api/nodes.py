"""Nodes, for operators (admin scope): their state and jobs; cordon, uncordon, drain."""
from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView
from marshmallow import validate

from app.api import Blueprint
from app.api.context import session, settings
from app.api.identity import require_scope
from app.api.schemas import StrictInteger, Timestamp
from app.api.strictjson import text_problem
from app.domain import nodes
from app.domain.callers import SCOPE_ADMIN
from app.domain.errors import NotFound
from app.domain.jobs import utcnow
from app.models import NODE_STATES

blp = Blueprint("nodes", __name__, url_prefix="/api/v1/nodes", description="Operators: node state, cordon, uncordon, drain")

MAX_REASON_LENGTH = 512
MAX_DRAIN_GRACE_SECONDS = 86400


def _printable(value: str) -> None:
    if text_problem(value) or any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ma.ValidationError("must be printable text")


class NodeActionSchema(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    reason = ma.fields.String(
        validate=[validate.Length(min=1, max=MAX_REASON_LENGTH), _printable],
        metadata={"description": "Why (kept in the node's audit trail); defaults to '<verb> by <caller>'"},
    )


class DrainSchema(NodeActionSchema):
    grace_seconds = StrictInteger(
        validate=validate.Range(min=0, max=MAX_DRAIN_GRACE_SECONDS),
        metadata={"description": "How long running jobs may still finish before they are stopped and requeued; default WORKER_DRAIN_SECONDS"},
    )


class NodeJobSchema(ma.Schema):
    id = ma.fields.String()
    status = ma.fields.String()
    owner = ma.fields.String()
    priority = ma.fields.Integer()
    started_at = Timestamp(allow_none=True)


class NodeEventSchema(ma.Schema):
    at = Timestamp()
    from_state = ma.fields.String(allow_none=True)
    to_state = ma.fields.String()
    actor = ma.fields.String()
    reason = ma.fields.String()


class NodeSchema(ma.Schema):
    cluster = ma.fields.String()
    name = ma.fields.String()
    state = ma.fields.String(validate=validate.OneOf(NODE_STATES))
    state_reason = ma.fields.String(allow_none=True)
    state_by = ma.fields.String(allow_none=True)
    state_at = Timestamp(allow_none=True)
    drain_deadline = Timestamp(allow_none=True, metadata={"description": "While draining: jobs still running then are stopped and requeued"})
    alive = ma.fields.Boolean(metadata={"description": "Heartbeated within NODE_LEASE_SECONDS"})
    heartbeat_at = Timestamp()
    gpu_type = ma.fields.String(allow_none=True)
    gpu_total = ma.fields.Integer()
    slots = ma.fields.Integer()
    jobs = ma.fields.List(ma.fields.Nested(NodeJobSchema), metadata={"description": "Jobs holding resources there"})


class NodeDetailSchema(NodeSchema):
    events = ma.fields.List(ma.fields.Nested(NodeEventSchema), metadata={"description": "Latest state changes, newest first"})


class NodeListSchema(ma.Schema):
    nodes = ma.fields.List(ma.fields.Nested(NodeSchema))


def _one(cluster_name: str, node_name: str) -> nodes.NodeSummary:
    found = nodes.list_nodes(session(), utcnow(), settings().node_lease_seconds, cluster=cluster_name, name=node_name)
    if not found:
        raise NotFound(f"Node {cluster_name}/{node_name} not found")
    return found[0]


def _detail(cluster_name: str, node_name: str) -> dict[str, Any]:
    node = _one(cluster_name, node_name)
    return {**node.__dict__, "events": nodes.audit(session(), cluster_name, node_name)}


@blp.route("/")
class NodeCollection(MethodView):
    @blp.response(200, NodeListSchema)
    @blp.alt_response(403, description="Not an admin")
    def get(self) -> dict[str, Any]:
        """List nodes with their state (ready, cordoned, draining) and their jobs"""
        require_scope(SCOPE_ADMIN)
        return {"nodes": nodes.list_nodes(session(), utcnow(), settings().node_lease_seconds)}


@blp.route("/<string:cluster_name>/<string:node_name>")
class NodeItem(MethodView):
    @blp.response(200, NodeDetailSchema)
    @blp.alt_response(403, description="Not an admin")
    @blp.alt_response(404, description="Node not found")
    def get(self, cluster_name: str, node_name: str) -> dict[str, Any]:
        """A node's state, jobs and latest state changes (who cordoned or drained it, when, why)"""
        require_scope(SCOPE_ADMIN)
        return _detail(cluster_name, node_name)


def _change(cluster_name: str, node_name: str, target: nodes.NodeState, body: dict[str, Any]) -> dict[str, Any]:
    caller = require_scope(SCOPE_ADMIN)
    grace = body.get("grace_seconds", settings().worker_drain_seconds) if target is nodes.NodeState.DRAINING else None
    nodes.change_state(session(), cluster_name, node_name, target, actor=caller.sub, reason=body.get("reason"), grace_seconds=grace)
    return _detail(cluster_name, node_name)


@blp.route("/<string:cluster_name>/<string:node_name>/cordon")
class NodeCordon(MethodView):
    @blp.arguments(NodeActionSchema, required=False)
    @blp.response(200, NodeDetailSchema)
    @blp.alt_response(403, description="Not an admin")
    @blp.alt_response(404, description="Node not found")
    def post(self, body: dict[str, Any], cluster_name: str, node_name: str) -> dict[str, Any]:
        """Cordon a node: no new jobs are placed there; running jobs go on"""
        return _change(cluster_name, node_name, nodes.NodeState.CORDONED, body or {})


@blp.route("/<string:cluster_name>/<string:node_name>/uncordon")
class NodeUncordon(MethodView):
    @blp.arguments(NodeActionSchema, required=False)
    @blp.response(200, NodeDetailSchema)
    @blp.alt_response(403, description="Not an admin")
    @blp.alt_response(404, description="Node not found")
    def post(self, body: dict[str, Any], cluster_name: str, node_name: str) -> dict[str, Any]:
        """Uncordon a cordoned or draining node: jobs are placed there again"""
        return _change(cluster_name, node_name, nodes.NodeState.READY, body or {})


@blp.route("/<string:cluster_name>/<string:node_name>/drain")
class NodeDrain(MethodView):
    @blp.arguments(DrainSchema, required=False)
    @blp.response(200, NodeDetailSchema)
    @blp.alt_response(403, description="Not an admin")
    @blp.alt_response(404, description="Node not found")
    def post(self, body: dict[str, Any], cluster_name: str, node_name: str) -> dict[str, Any]:
        """Drain a node: no new jobs, then its jobs go back to the backlog

        Jobs admitted there but not started go back at once; running jobs may finish for `grace_seconds`, then
        the node's worker stops them gracefully (SIGTERM, KILL_GRACE_SECONDS, SIGKILL) and requeues them without
        spending a retry. The node stays draining until uncordoned.
        """
        return _change(cluster_name, node_name, nodes.NodeState.DRAINING, body or {})
