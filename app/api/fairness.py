"""Fair share: each owner's decayed usage, weight, share, rank and backlog (admins: everyone; others: themselves)."""
from __future__ import annotations

import marshmallow as ma
from flask.views import MethodView

from app.api import Blueprint
from app.api.context import session, settings
from app.api.identity import require_scope
from app.domain import fairness
from app.domain.callers import SCOPE_READ
from app.domain.jobs import utcnow

blp = Blueprint("fairness", __name__, url_prefix="/api/v1/fairness", description="Fair-share standing of each owner")


class OwnerShareSchema(ma.Schema):
    owner = ma.fields.String(metadata={"description": "The submitters' tenant claim (JWT_TENANT_CLAIM), else the token's sub"})
    weight = ma.fields.Float(metadata={"description": "FAIR_SHARE_WEIGHTS; 1 when not set"})
    gpu_seconds = ma.fields.Float(metadata={"description": "Decayed GPU-seconds used"})
    cpu_seconds = ma.fields.Float()
    memory_gib_seconds = ma.fields.Float()
    usage_share = ma.fields.Float(metadata={"description": "Decayed usage as a dominant fraction of the fleet"})
    held_share = ma.fields.Float(metadata={"description": "What it holds now, as a dominant fraction of the fleet"})
    share = ma.fields.Float(metadata={"description": "(usage_share + held_share) / weight; at equal priority the lowest goes first"})
    rank = ma.fields.Integer(allow_none=True, metadata={"description": "1 = served first among owners with a backlog; null without one"})
    pending = ma.fields.Integer(metadata={"description": "Jobs in its backlog"})


class FairnessSchema(ma.Schema):
    half_life_seconds = ma.fields.Float()
    owners = ma.fields.List(ma.fields.Nested(OwnerShareSchema))


@blp.route("/")
class Fairness(MethodView):
    @blp.response(200, FairnessSchema)
    def get(self) -> fairness.FairnessReport:
        """Per-owner usage, weight, share and backlog, as the scheduler ranks them"""
        caller = require_scope(SCOPE_READ)
        return fairness.report(session(), settings(), utcnow(), owner=None if caller.is_admin else caller.fair_share_owner)
