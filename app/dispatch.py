"""Publishing admitted jobs' tasks to the broker, from the outbox, only after their rows committed."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Protocol

from celery import Celery
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain.jobs import utcnow
from app.domain.scheduling import stale_outbox
from app.models import OutboxMessage
from config import Settings

log = logging.getLogger(__name__)


class TaskPublisher(Protocol):
    def publish(self, task_name: str, queue: str, args: list[object]) -> None: ...


class CeleryPublisher:
    """Sends tasks by name: the API and scheduler never import the worker code."""

    def __init__(self, settings: Settings) -> None:
        self.celery = Celery("jobservice-publisher", broker=settings.redis_url)
        self.celery.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True)

    def publish(self, task_name: str, queue: str, args: list[object]) -> None:
        self.celery.send_task(task_name, args=args, queue=queue)

    def close(self) -> None:
        self.celery.close()


def publish_outbox(session: Session, publisher: TaskPublisher, message_ids: list[int] | None = None, *, older_than: datetime | None = None) -> int:
    """Publish outbox messages (the given ones, or every one older than `older_than`), then delete them.

    A crash between publish and delete publishes the message again later: workers ignore a task
    whose dispatch token no longer matches, so a duplicate costs nothing.
    """
    if message_ids is not None:
        query = select(OutboxMessage).where(OutboxMessage.id.in_(message_ids)).order_by(OutboxMessage.id)
        messages = list(session.scalars(query)) if message_ids else []
    else:
        messages = stale_outbox(session, older_than or utcnow())
    session.rollback()  # end the read transaction: publishing must not hold row locks
    published: list[int] = []
    for message in messages:
        try:
            publisher.publish(message.task_name, message.queue, list(message.args))
            published.append(message.id)
        except Exception:  # noqa: BLE001 - the sweep retries it
            log.exception("publishing %s for job %s failed; will retry", message.task_name, message.job_id, extra={"job_id": message.job_id})
    if published:
        with transaction(session):
            session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(published)))
    return len(published)


def outbox_ids_for(session: Session, job_ids: list[str]) -> list[int]:
    if not job_ids:
        return []
    return list(session.scalars(select(OutboxMessage.id).where(OutboxMessage.job_id.in_(job_ids))))


def republish_cutoff(settings: Settings) -> datetime:
    return utcnow() - timedelta(seconds=settings.outbox_republish_after_seconds)
