"""Publishing admitted jobs' tasks to the broker, from the outbox, only after their rows committed."""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Protocol

from celery import Celery
from sqlalchemy import delete, text
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


def publish(session: Session, publisher: TaskPublisher, messages: list[OutboxMessage]) -> int:
    """Publish committed outbox messages, then delete them.

    A crash between publish and delete publishes the message again later: workers ignore a task
    whose dispatch token no longer matches, so a duplicate costs nothing.
    """
    published: list[int] = []
    for message in messages:
        try:
            publisher.publish(message.task_name, message.queue, list(message.args))
            published.append(message.id)
        except Exception:  # noqa: BLE001 - the sweep retries it
            log.exception("publishing %s for job %s failed; will retry", message.task_name, message.job_id, extra={"job_id": message.job_id})
    if published:
        with transaction(session):
            # No wait for the WAL flush: this delete is the one write whose loss (a database crash right after)
            # costs nothing but a second publication, which the claim's compare-and-set ignores.
            session.execute(text("SET LOCAL synchronous_commit = off"))
            session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(published)))
    return len(published)


def publish_stale(session: Session, publisher: TaskPublisher, settings: Settings) -> int:
    """The sweep: publish what a crashed publisher left in the outbox."""
    cutoff = utcnow() - timedelta(seconds=settings.outbox_republish_after_seconds)
    messages = stale_outbox(session, cutoff)
    # Detached with what was read: a rollback expires ORM objects, and reading one afterwards would open a
    # transaction per message (and fail for a row the scheduler's own publish deleted meanwhile).
    for message in messages:
        session.expunge(message)
    session.rollback()  # end the read transaction: publishing must not hold it open
    return publish(session, publisher, messages)
