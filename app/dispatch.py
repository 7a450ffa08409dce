"""Publishing admitted jobs' tasks to the broker, from the outbox, only after their rows committed."""
from __future__ import annotations

import logging
from collections.abc import Sequence
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


Task = tuple[str, str, list[object]]  # task name, queue, args


class TaskPublisher(Protocol):
    def publish(self, task_name: str, queue: str, args: list[object]) -> None: ...

    def publish_all(self, tasks: Sequence[Task]) -> None:
        """Every task, in as few broker round trips as the broker allows; raises if any of them may not have been
        sent (some may have been: a duplicate costs nothing, see publish_only)."""


class CeleryPublisher:
    """Sends tasks by name: the API and scheduler never import the worker code."""

    def __init__(self, settings: Settings) -> None:
        self.celery = Celery("jobservice-publisher", broker=settings.redis_url)
        self.celery.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True)

    def publish(self, task_name: str, queue: str, args: list[object]) -> None:
        self._send(task_name, queue, args)

    def publish_all(self, tasks: Sequence[Task]) -> None:
        # kombu's producer batch: the Redis transport buffers each message's LPUSH in one pipeline, sent when the
        # block ends (or every 1,000 commands), instead of a Redis round trip and a new client per message.
        with self.celery.producer_or_acquire() as producer, producer.batch():
            for task_name, queue, args in tasks:
                self._send(task_name, queue, args, producer)

    def _send(self, task_name: str, queue: str, args: list[object], producer: object = None) -> None:
        # No declaration: the task goes to the anonymous exchange, which routes by queue name (an LPUSH on the queue's
        # list), and the worker declares the queues it consumes. Declaring copied and bound the queue entity on every
        # send. The args' repr (two ids) is written as it is, not through Celery's size-bounded saferepr. Together
        # these were a quarter of a publish's CPU (benchmarks/publish.py).
        self.celery.send_task(task_name, args=args, queue=queue, producer=producer, declare=[],
                              argsrepr=repr(args), kwargsrepr="{}")

    def close(self) -> None:
        self.celery.close()


def publish_only(publisher: TaskPublisher, messages: list[OutboxMessage]) -> list[int]:
    """Publish committed outbox messages; returns the ids of those sent, whose rows the caller deletes.

    Until they are deleted, the sweep publishes them again once OUTBOX_REPUBLISH_AFTER_SECONDS old: workers
    ignore a task whose dispatch token no longer matches, so a duplicate costs nothing.

    Several are sent together (a pass that admitted 300 jobs made 300 round trips to Redis); if that fails they are
    sent one by one, so that one message the broker refuses delays no other.
    """
    if len(messages) > 1:
        try:
            publisher.publish_all([(m.task_name, m.queue, list(m.args)) for m in messages])
            return [m.id for m in messages]
        except Exception:  # noqa: BLE001 - one by one below; what the batch sent is sent again (ignored by the claim)
            log.warning("publishing %d tasks together failed; publishing them one by one", len(messages), exc_info=True)
    published: list[int] = []
    for message in messages:
        try:
            publisher.publish(message.task_name, message.queue, list(message.args))
            published.append(message.id)
        except Exception:  # noqa: BLE001 - the sweep retries it
            log.exception("publishing %s for job %s failed; will retry", message.task_name, message.job_id, extra={"job_id": message.job_id})
    return published


def publish(session: Session, publisher: TaskPublisher, messages: list[OutboxMessage]) -> int:
    """Publish committed outbox messages, then delete them (in a transaction of their own).

    A crash between publish and delete publishes the message again later: workers ignore a task
    whose dispatch token no longer matches, so a duplicate costs nothing. The scheduler's passes use
    publish_only and delete the rows in their next pass's first statement (app.domain.scheduling.admit).
    """
    published = publish_only(publisher, messages)
    delete_published(session, published)
    return len(published)


def delete_published(session: Session, ids: list[int]) -> None:
    """Delete the outbox rows of published tasks, in a transaction of their own."""
    if ids:
        with transaction(session):
            # No wait for the WAL flush: this delete is the one write whose loss (a database crash right after)
            # costs nothing but a second publication, which the claim's compare-and-set ignores.
            session.execute(text("SET LOCAL synchronous_commit = off"))
            session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))


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
