"""Publishing a pass's tasks to the real Redis broker (app.dispatch): together, in order, each to its queue; one that
the broker cannot take delays no other."""
from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis

from app.dispatch import CeleryPublisher, Task, publish_only
from app.domain.scheduling import EXECUTE_TASK
from app.models import OutboxMessage
from config import Settings


class CountingPublisher(CeleryPublisher):
    """The real publisher, counting which of its two ways each publication took."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.singles = 0
        self.batches = 0

    def publish(self, task_name: str, queue: str, args: list[object]) -> None:
        self.singles += 1
        super().publish(task_name, queue, args)

    def publish_all(self, tasks: Sequence[Task]) -> None:
        self.batches += 1
        super().publish_all(tasks)


@pytest.fixture
def publisher(settings: Settings) -> Iterator[CountingPublisher]:
    publisher = CountingPublisher(settings)
    yield publisher
    publisher.close()


@pytest.fixture
def queues(settings: Settings) -> Iterator[tuple[str, str]]:
    """Two queue names of this test's own (their Redis lists are removed afterwards)."""
    names = (f"dispatch-test-{uuid.uuid4().hex}.a", f"dispatch-test-{uuid.uuid4().hex}.b")
    yield names
    client = redis.Redis.from_url(settings.redis_url or "")
    client.delete(*names)
    client.close()


def delivered(settings: Settings, queue: str) -> list[tuple[str, list[Any]]]:
    """(task name, args) of each message waiting in `queue`, oldest first (kombu LPUSHes, a worker BRPOPs)."""
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    messages = [json.loads(item) for item in reversed(raw)]
    return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]


def message(id: int, queue: str, args: list[Any]) -> OutboxMessage:
    return OutboxMessage(id=id, job_id=str(args[0]), task_name=EXECUTE_TASK, queue=queue, args=args)


def test_a_pass_s_tasks_are_published_together_each_to_its_queue_in_order(
        settings: Settings, publisher: CountingPublisher, queues: tuple[str, str]) -> None:
    a, b = queues
    messages = [message(1, a, ["job-1", "t1"]), message(2, b, ["job-2", "t2"]), message(3, a, ["job-3", "t3"])]
    assert publish_only(publisher, messages) == [1, 2, 3]
    assert (publisher.batches, publisher.singles) == (1, 0)
    assert delivered(settings, a) == [(EXECUTE_TASK, ["job-1", "t1"]), (EXECUTE_TASK, ["job-3", "t3"])]
    assert delivered(settings, b) == [(EXECUTE_TASK, ["job-2", "t2"])]

    assert publish_only(publisher, [message(4, b, ["job-4", "t4"])]) == [4]  # a lone task: no batch to set up
    assert (publisher.batches, publisher.singles) == (1, 1)
    assert delivered(settings, b)[-1] == (EXECUTE_TASK, ["job-4", "t4"])


def test_a_task_goes_to_its_queue_without_declaring_it_and_shows_its_ids_as_its_args(
        settings: Settings, publisher: CountingPublisher, queues: tuple[str, str]) -> None:
    a, _ = queues
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        assert publish_only(publisher, [message(1, a, ["job-1", "t1"]), message(2, a, ["job-2", "t2"])]) == [1, 2]
        assert publish_only(publisher, [message(3, a, ["job-3", "t3"])]) == [3]
        # Not bound: the anonymous exchange routes by queue name, and the worker declares what it consumes.
        bound = [member for key in client.scan_iter("_kombu.binding.*") for member in client.smembers(key)]
        assert [member for member in bound if a.encode() in member] == []
        headers = [json.loads(raw)["headers"] for raw in reversed(client.lrange(a, 0, -1))]
    finally:
        client.close()
    # What Flower shows of a task: its ids, as Celery's own repr would write them.
    assert [(h["argsrepr"], h["kwargsrepr"]) for h in headers] == [(repr(["job-1", "t1"]), "{}"), (repr(["job-2", "t2"]), "{}"),
                                                                    (repr(["job-3", "t3"]), "{}")]
    assert delivered(settings, a) == [(EXECUTE_TASK, ["job-1", "t1"]), (EXECUTE_TASK, ["job-2", "t2"]), (EXECUTE_TASK, ["job-3", "t3"])]


def test_a_batch_the_broker_refuses_is_published_one_by_one_and_a_refused_task_delays_no_other(
        settings: Settings, publisher: CountingPublisher, queues: tuple[str, str]) -> None:
    a, _ = queues
    # A set is not JSON: the serializer refuses the second task, which fails the batch before anything was sent.
    messages = [message(1, a, ["job-1", "t1"]), message(2, a, ["job-2", {"not", "json"}]), message(3, a, ["job-3", "t3"])]
    assert publish_only(publisher, messages) == [1, 3]  # the refused one's outbox row stays: the sweep retries it
    assert (publisher.batches, publisher.singles) == (1, 3)
    # Each once: the failed batch sent nothing (kombu discards what a batch buffered when its block raises).
    assert delivered(settings, a) == [(EXECUTE_TASK, ["job-1", "t1"]), (EXECUTE_TASK, ["job-3", "t3"])]


def test_a_worker_s_delivered_task_leaves_no_acknowledgement_bookkeeping_in_redis_and_a_clean_stop_returns_it(
        settings: Settings, publisher: CountingPublisher, queues: tuple[str, str]) -> None:
    """The workers' Celery app consumes without kombu's ack emulation (workers.celery_app): a delivered message is no
    longer written to Redis's `unacked` hash and index (two pipelines per job) for a redelivery an hour later, which
    requeue_unclaimed makes moot. A worker that stops cleanly before starting a reserved task still puts it back."""
    from workers.celery_app import create_celery_app

    a, _ = queues
    publisher.publish(EXECUTE_TASK, a, ["job-1", "t1"])
    client = redis.Redis.from_url(settings.redis_url or "")
    worker_app = create_celery_app(settings)
    try:
        unacked_before = client.hlen("unacked")
        with worker_app.connection_for_read() as connection:
            channel = connection.default_channel
            got = channel.basic_get(a)  # reserved, not acknowledged: as a worker holds a task it has not started
            assert got is not None
            assert got.decode()[0] == ["job-1", "t1"]
            assert client.llen(a) == 0
            assert client.hlen("unacked") == unacked_before  # with ack emulation, the message would be recorded here
        # The connection closed without an ack: the message is back in its queue, once.
        assert delivered(settings, a) == [(EXECUTE_TASK, ["job-1", "t1"])]
    finally:
        worker_app.close()
        client.close()
