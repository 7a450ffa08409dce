"""Fair share: each owner's decayed usage, weight, share, rank and backlog (admins: everyone; others: themselves),
and the weights per tenant that admins set."""
from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView
from flask_smorest import abort
from marshmallow import validate

from app.api import Blueprint
from app.api.context import session, settings
from app.api.identity import require_scope
from app.api.quotas import QuotaSchema, tenant_name
from app.api.schemas import StrictFloat, Timestamp
from app.domain import fairness, weights
from app.domain.callers import SCOPE_ADMIN, SCOPE_READ
from app.domain.jobs import utcnow

blp = Blueprint("fairness", __name__, url_prefix="/api/v1/fairness", description="Fair-share standing of each owner")


class OwnerShareSchema(ma.Schema):
    owner = ma.fields.String(metadata={"description": "The submitters' tenant claim (JWT_TENANT_CLAIM), else the token's sub"})
    weight = ma.fields.Float(metadata={"description": "Set by an admin (/fairness/weights/{tenant}), else FAIR_SHARE_WEIGHTS, else 1"})
    gpu_seconds = ma.fields.Float(metadata={"description": "Decayed GPU-seconds used"})
    cpu_seconds = ma.fields.Float()
    memory_gib_seconds = ma.fields.Float()
    usage_share = ma.fields.Float(metadata={"description": "Decayed usage as a dominant fraction of the fleet"})
    held_share = ma.fields.Float(metadata={"description": "What it holds now, as a dominant fraction of the fleet"})
    share = ma.fields.Float(metadata={"description": "(usage_share + held_share) / weight; at equal priority the lowest goes first"})
    rank = ma.fields.Integer(allow_none=True, metadata={"description": "1 = served first among owners with a backlog; null without one"})
    pending = ma.fields.Integer(metadata={"description": "Jobs in its backlog"})
    quotas = ma.fields.List(ma.fields.Nested(QuotaSchema), metadata={"description": "Its quotas (empty: unlimited): quota, used, borrowed"})


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


# --- weights per tenant (admins) ---------------------------------------------------------------


class WeightPutSchema(ma.Schema):
    weight = StrictFloat(
        required=True,
        validate=validate.Range(min=weights.MIN_WEIGHT, max=weights.MAX_WEIGHT, error="weight must be between {min} and {max}"),
        metadata={"description": f"A JSON number, {weights.MIN_WEIGHT:g} .. {weights.MAX_WEIGHT:g}: the tenant is entitled to "
                                 "weight / (sum of the weights of the tenants with a backlog) of the fleet"},
    )


class WeightChangeSchema(ma.Schema):
    at = Timestamp()
    actor = ma.fields.String(metadata={"description": "The admin's token sub"})
    action = ma.fields.String(metadata={"description": "put or delete"})
    before = ma.fields.Float(allow_none=True, metadata={"description": "The weight an admin had set before; null: none"})
    after = ma.fields.Float(allow_none=True, metadata={"description": "The weight an admin set; null: removed"})


class TenantWeightSchema(ma.Schema):
    tenant = ma.fields.String(metadata={"description": "A fair-share owner: the submitters' JWT_TENANT_CLAIM, else the token's sub"})
    weight = ma.fields.Float(metadata={"description": "The weight the scheduler uses"})
    source = ma.fields.String(
        validate=validate.OneOf([weights.ADMIN, weights.SETTING, weights.DEFAULT]),
        metadata={"description": "admin (set here), setting (FAIR_SHARE_WEIGHTS) or default (1)"},
    )
    updated_at = Timestamp(allow_none=True, metadata={"description": "When an admin set it; null otherwise"})
    updated_by = ma.fields.String(allow_none=True)


class TenantWeightDetailSchema(TenantWeightSchema):
    changes = ma.fields.List(ma.fields.Nested(WeightChangeSchema),
                             metadata={"description": f"The latest {weights.HISTORY} changes, newest first"})


class WeightListSchema(ma.Schema):
    default_weight = ma.fields.Float(metadata={"description": "The weight of a tenant listed nowhere"})
    weights = ma.fields.List(ma.fields.Nested(TenantWeightSchema),
                             metadata={"description": "Every tenant whose weight an admin or FAIR_SHARE_WEIGHTS set, by name"})


def _setting() -> dict[str, float]:
    return dict(settings().fair_share_weights)


def _detail(tenant: str) -> dict[str, Any]:
    db = session()
    found = weights.of_tenant(db, tenant, _setting())
    return {**vars(found), "changes": weights.history(db, tenant)}


@blp.route("/weights/")
class WeightCollection(MethodView):
    @blp.response(200, WeightListSchema)
    @blp.alt_response(403, description="Admins only")
    def get(self) -> dict[str, Any]:
        """Every tenant's fair-share weight other than the default, and where it comes from"""
        require_scope(SCOPE_ADMIN)
        return {"default_weight": weights.DEFAULT_WEIGHT, "weights": weights.listing(session(), _setting())}


@blp.route("/weights/<string:tenant>")
class TenantWeight(MethodView):
    @blp.response(200, TenantWeightDetailSchema)
    @blp.alt_response(403, description="Admins only")
    def get(self, tenant: str) -> dict[str, Any]:
        """A tenant's fair-share weight, where it comes from, and the latest changes"""
        require_scope(SCOPE_ADMIN)
        return _detail(tenant_name(tenant))

    @blp.arguments(WeightPutSchema)
    @blp.response(200, TenantWeightDetailSchema)
    @blp.alt_response(403, description="Admins only")
    def put(self, body: dict[str, Any], tenant: str) -> dict[str, Any]:
        """Set a tenant's fair-share weight (wins over FAIR_SHARE_WEIGHTS; audited); the next scheduler pass uses it"""
        caller = require_scope(SCOPE_ADMIN)
        tenant = tenant_name(tenant)
        weights.put(session(), tenant, body["weight"], caller.sub, utcnow())
        return _detail(tenant)

    @blp.response(204)
    @blp.alt_response(403, description="Admins only")
    def delete(self, tenant: str) -> None:
        """Remove the weight an admin set: the tenant is back to FAIR_SHARE_WEIGHTS, else 1 (audited)"""
        caller = require_scope(SCOPE_ADMIN)
        if not weights.remove(session(), tenant_name(tenant), caller.sub, utcnow()):
            abort(404, message=f"Tenant {tenant} has no weight set by an admin")
