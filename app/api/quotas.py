"""Quotas per tenant (admins only): nominal GPUs, CPU and memory per cluster or fleet-wide, and a borrowing limit."""
from __future__ import annotations

import re
from typing import Any

import marshmallow as ma
from flask.views import MethodView
from flask_smorest import abort
from marshmallow import validate

from app.api import Blueprint
from app.api.context import session
from app.api.identity import require_scope
from app.api.schemas import MAX_QUANTITY_LENGTH, QUANTITY_PATTERN, FullMatch, StrictInteger, Timestamp
from app.domain import quotas
from app.domain.quotas import HISTORY
from app.domain.callers import SCOPE_ADMIN
from app.domain.jobs import utcnow
from app.domain.quantities import cpu_to_millis, memory_to_bytes

blp = Blueprint("quotas", __name__, url_prefix="/api/v1/quotas", description="Quotas per tenant (admins)")

# Bounds: far above any fleet, far below PostgreSQL's bigint.
MAX_QUOTA_GPUS = 1_000_000
MAX_QUOTA_CPU = "1000000"  # cores
MAX_QUOTA_MEMORY = "1Ei"
MAX_QUOTA_ROWS = 64  # clusters one tenant's quota names
CLUSTER_PATTERN = r"^(\*|[A-Za-z0-9][A-Za-z0-9_.\-]{0,62})$"
# A tenant with a quota is a token claim (or a sub) of this shape; the OpenAPI document states the same pattern.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@:+\-]{0,199}$"
_TENANT = re.compile(TENANT_PATTERN)


class QuotaQuantity(ma.fields.String):
    """A Kubernetes quantity string ("64", "500m", "512Gi"), 0 .. a constant ceiling."""

    def __init__(self, parse: Any, ceiling: str, **kwargs: Any) -> None:
        super().__init__(
            validate=[validate.Length(min=1, max=MAX_QUANTITY_LENGTH), FullMatch(QUANTITY_PATTERN, error="not a quantity")], **kwargs
        )
        self.parse = parse
        self.ceiling = ceiling

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise ma.ValidationError(f"must be a string quantity such as \"64\" or \"512Gi\", not {type(value).__name__}")
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > MAX_QUANTITY_LENGTH:
            raise ma.ValidationError(f"at most {MAX_QUANTITY_LENGTH} characters")
        try:
            amount = self.parse(text)
        except ValueError as exc:
            raise ma.ValidationError(str(exc)) from exc
        if amount > self.parse(self.ceiling):
            raise ma.ValidationError(f"must be at most {self.ceiling}")
        return text


def _gpus(**kwargs: Any) -> StrictInteger:
    return StrictInteger(validate=validate.Range(min=0, max=MAX_QUOTA_GPUS, error="gpu must be between {min} and {max}"), **kwargs)


class BorrowingLimitSchema(ma.Schema):
    gpu = _gpus(load_default=0, metadata={"description": f"GPUs it may use beyond its quota while idle; 0 .. {MAX_QUOTA_GPUS}"})
    cpu = QuotaQuantity(cpu_to_millis, MAX_QUOTA_CPU, load_default="0", metadata={"description": f"A quantity, 0 .. {MAX_QUOTA_CPU}"})
    memory = QuotaQuantity(memory_to_bytes, MAX_QUOTA_MEMORY, load_default="0",
                           metadata={"description": f"A quantity, 0 .. {MAX_QUOTA_MEMORY}"})


class QuotaEntrySchema(ma.Schema):
    cluster = ma.fields.String(
        load_default=quotas.FLEET, validate=FullMatch(CLUSTER_PATTERN, error="cluster is '*' (fleet-wide) or a cluster name"),
        metadata={"description": "'*' (fleet-wide, the default) or a cluster name (`local`, a KUBERNETES_CLUSTERS name)"},
    )
    gpu = _gpus(load_default=None, allow_none=True, metadata={"description": f"Nominal GPUs; null or absent: not limited; 0 .. {MAX_QUOTA_GPUS}"})
    cpu = QuotaQuantity(cpu_to_millis, MAX_QUOTA_CPU, load_default=None, allow_none=True,
                        metadata={"description": f"Nominal CPU, a quantity string 0 .. {MAX_QUOTA_CPU}; null or absent: not limited"})
    memory = QuotaQuantity(memory_to_bytes, MAX_QUOTA_MEMORY, load_default=None, allow_none=True,
                           metadata={"description": f"Nominal memory, a quantity string 0 .. {MAX_QUOTA_MEMORY}; null or absent: not limited"})
    borrowing_limit = ma.fields.Nested(BorrowingLimitSchema, load_default=lambda: BorrowingLimitSchema().load({}))


class QuotaPutSchema(ma.Schema):
    quotas = ma.fields.List(
        ma.fields.Nested(QuotaEntrySchema), required=True,
        validate=validate.Length(min=1, max=MAX_QUOTA_ROWS, error="quotas has 1 to {max} entries"),
        metadata={"description": "One entry per cluster ('*': fleet-wide); replaces the tenant's quotas"},
    )

    @ma.validates_schema
    def _distinct(self, data: dict[str, Any], **kwargs: Any) -> None:
        clusters = [entry["cluster"] for entry in data.get("quotas") or []]
        if len(set(clusters)) != len(clusters):
            raise ma.ValidationError("each cluster appears at most once", "quotas")


class AmountsSchema(ma.Schema):
    gpu = ma.fields.Integer()
    cpu = ma.fields.String()
    memory = ma.fields.String()


class QuotaSchema(ma.Schema):
    cluster = ma.fields.String()
    gpu = ma.fields.Integer(allow_none=True, metadata={"description": "null: not limited"})
    cpu = ma.fields.String(allow_none=True)
    memory = ma.fields.String(allow_none=True)
    borrowing_limit = ma.fields.Nested(AmountsSchema)
    used = ma.fields.Nested(AmountsSchema, metadata={"description": "What the tenant's jobs hold now under this quota"})
    borrowed = ma.fields.Nested(AmountsSchema, metadata={"description": "The part of `used` beyond the nominal quota"})


class QuotaChangeSchema(ma.Schema):
    at = Timestamp()
    actor = ma.fields.String()
    action = ma.fields.String(metadata={"description": "put, delete or seed (QUOTAS_FILE)"})
    before = ma.fields.List(ma.fields.Dict())
    after = ma.fields.List(ma.fields.Dict())


class TenantQuotaSchema(ma.Schema):
    tenant = ma.fields.String()
    quotas = ma.fields.List(ma.fields.Nested(QuotaSchema), metadata={"description": "Empty: unlimited"})
    changes = ma.fields.List(ma.fields.Nested(QuotaChangeSchema), metadata={"description": f"The latest {HISTORY} changes, newest first"})


class QuotaListSchema(ma.Schema):
    tenants = ma.fields.List(ma.fields.Nested(TenantQuotaSchema))


def tenant_name(value: str) -> str:
    """A tenant in a path, validated (400 naming `tenant`): quotas and fair-share weights name tenants alike."""
    if not _TENANT.fullmatch(value):
        abort(400, message="Invalid tenant", errors={"tenant": ["1-200 of A-Z a-z 0-9 _ . @ : + -, starting alphanumeric"]})
    return value


def _view(tenant: str, with_history: bool = True) -> dict[str, Any]:
    db = session()
    rows = quotas.of_tenant(db, tenant)
    used = quotas.usage(db, tenant) if rows else {}
    changes = quotas.history(db, tenant) if with_history else []
    return {"tenant": tenant, "quotas": quotas.standing(rows, used), "changes": changes}


@blp.route("/")
class QuotaCollection(MethodView):
    @blp.response(200, QuotaListSchema)
    @blp.alt_response(403, description="Admins only")
    def get(self) -> dict[str, Any]:
        """Every tenant with a quota: its quotas, usage and what it borrows"""
        require_scope(SCOPE_ADMIN)
        db = session()
        everything = quotas.load_all(db)
        used = quotas.usage(db) if everything else {}
        return {"tenants": [{"tenant": t, "quotas": quotas.standing(rows, used), "changes": []} for t, rows in everything.items()]}


@blp.route("/<string:tenant>")
class TenantQuota(MethodView):
    @blp.response(200, TenantQuotaSchema)
    @blp.alt_response(403, description="Admins only")
    def get(self, tenant: str) -> dict[str, Any]:
        """A tenant's quotas (empty: unlimited), usage, what it borrows, and the latest changes"""
        require_scope(SCOPE_ADMIN)
        return _view(tenant_name(tenant))

    @blp.arguments(QuotaPutSchema)
    @blp.response(200, TenantQuotaSchema)
    @blp.alt_response(403, description="Admins only")
    def put(self, body: dict[str, Any], tenant: str) -> dict[str, Any]:
        """Set a tenant's quotas (replaces them all; audited)"""
        caller = require_scope(SCOPE_ADMIN)
        tenant = tenant_name(tenant)
        quotas.replace(session(), tenant, to_quotas(tenant, body["quotas"]), caller.sub, utcnow())
        return _view(tenant)

    @blp.response(204)
    @blp.alt_response(403, description="Admins only")
    def delete(self, tenant: str) -> None:
        """Remove a tenant's quotas: unlimited again (audited)"""
        caller = require_scope(SCOPE_ADMIN)
        if not quotas.remove(session(), tenant_name(tenant), caller.sub, utcnow()):
            abort(404, message=f"Tenant {tenant} has no quota")


def to_quotas(tenant: str, entries: list[dict[str, Any]]) -> list[quotas.Quota]:
    def amounts(entry: dict[str, Any]) -> tuple[Any, Any, Any]:
        cpu, memory = entry["cpu"], entry["memory"]
        return (entry["gpu"], None if cpu is None else cpu_to_millis(cpu), None if memory is None else memory_to_bytes(memory))

    return [quotas.Quota(tenant, e["cluster"], amounts(e), amounts(e["borrowing_limit"])) for e in entries]


def parse_file_entries(tenant: str, entries: Any) -> list[quotas.Quota]:
    """QUOTAS_FILE's entries for one tenant, validated as PUT validates them (ValueError if not)."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise ValueError(f"invalid tenant {tenant!r}")
    try:
        body = QuotaPutSchema().load({"quotas": entries})
    except ma.ValidationError as exc:
        raise ValueError(f"tenant {tenant}: {exc.messages}") from exc
    return to_quotas(tenant, body["quotas"])
