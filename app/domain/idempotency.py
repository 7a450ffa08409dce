"""Idempotency keys: a retried submission gets the first one's answer instead of new jobs.

A key belongs to its caller (`sub`); its row holds a fingerprint of the request (the operation and
its canonical JSON body) and the answer given. The row is written by the submit's own transaction
(`remember`), so it exists exactly when the jobs do. Two identical requests racing: the second's
INSERT waits on the first's uncommitted row (the primary key), finds it once that commits, and its
own jobs roll back; it then answers what the first answered. If the first rolls back instead, the
second goes ahead. A row lives IDEMPOTENCY_KEY_TTL_SECONDS; an expired one is replaced when its key
is used again and purged by the scheduler's hourly purge (`purge_expired`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.domain.errors import Conflict

PURGE_BATCH = 10_000  # rows per statement: a purge never holds many locks at once


@dataclass(frozen=True)
class IdempotencyKey:
    key: str
    fingerprint: str


@dataclass(frozen=True)
class Stored:
    status_code: int
    response: dict[str, Any]


def fingerprint(operation: str, body: Any) -> str:
    """The same operation and the same JSON (key order and whitespace aside) give the same fingerprint."""
    canonical = json.dumps([operation, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


class KeyTaken(Exception):
    """Another request stored this key first (it committed while this one was working)."""


_FIND = text(
    "SELECT fingerprint, status_code, response, expires_at <= :now AS expired FROM idempotency_keys "
    "WHERE owner = :owner AND key = :key"
)


def find(session: Session, owner: str, key: IdempotencyKey, now: datetime) -> Stored | None:
    """The stored answer for this key, None when the key is new (an expired row is deleted).

    Raises Conflict when the key was used with a different request."""
    row = session.execute(_FIND, {"owner": owner, "key": key.key, "now": now}).first()
    if row is None:
        return None
    if row.expired:
        session.execute(
            text("DELETE FROM idempotency_keys WHERE owner = :owner AND key = :key AND expires_at <= :now"),
            {"owner": owner, "key": key.key, "now": now},
        )
        return None
    if row.fingerprint != key.fingerprint:
        raise Conflict(
            "Idempotency-Key was already used with a different request",
            [{"field": "Idempotency-Key", "message": "use a new key for a different request"}],
        )
    return Stored(row.status_code, row.response)


_REMEMBER = text(
    """
    INSERT INTO idempotency_keys (owner, key, fingerprint, status_code, response, created_at, expires_at)
    VALUES (:owner, :key, :fingerprint, :status_code, CAST(:response AS jsonb), :now, :expires_at)
    ON CONFLICT (owner, key) DO NOTHING
    """
)


def remember(session: Session, owner: str, key: IdempotencyKey, stored: Stored, now: datetime, ttl_seconds: int) -> None:
    """Store the answer in the caller's transaction; raises KeyTaken if a racing request stored it first."""
    result = session.execute(
        _REMEMBER,
        {
            "owner": owner, "key": key.key, "fingerprint": key.fingerprint, "status_code": stored.status_code,
            "response": json.dumps(stored.response), "now": now, "expires_at": now + timedelta(seconds=ttl_seconds),
        },
    )
    if result.rowcount != 1:
        raise KeyTaken(key.key)


def purge_expired(session: Session, now: datetime) -> int:
    """Delete expired keys, a bounded batch per statement; commits each batch. Returns rows deleted."""
    deleted = 0
    while True:
        count = session.execute(
            text(
                "DELETE FROM idempotency_keys WHERE ctid IN "
                "(SELECT ctid FROM idempotency_keys WHERE expires_at <= :now LIMIT :batch)"
            ),
            {"now": now, "batch": PURGE_BATCH},
        ).rowcount or 0
        session.commit()
        deleted += count
        if count < PURGE_BATCH:
            return deleted
