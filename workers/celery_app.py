"""The Celery application of the workers (`celery --app workers.celery_app worker`), also read by Flower."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps, signals
from kombu import Queue

from app import logs
from app.domain.capacity import LOCAL_CLUSTER
from app.domain.scheduling import broker_queue
from config import Settings


def worker_queues(settings: Settings) -> list[str]:
    if settings.worker_executor == "kubernetes":
        from workers.context import served_cluster

        return [broker_queue(q.name, served_cluster(settings), None) for q in settings.queues]
    return [broker_queue(q.name, LOCAL_CLUSTER, settings.worker_node) for q in settings.queues]


def create_celery_app(settings: Settings) -> Celery:
    celery = Celery("jobservice", broker=settings.redis_url, include=["workers.tasks"])
    celery.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Acknowledge on start: a job may run for days, and an unacknowledged message would be
        # redelivered after the visibility timeout. A dead worker is found by its job's lease.
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        # Task events only while a monitor asks for them: Flower (the Procfile's) turns them on by itself
        # (`enable_events` every few seconds). Sent unasked, they were a Redis PUBLISH per task state, about 1 ms
        # of the worker's CPU per job (benchmarks/dispatch.py), and the `task-started` one was sent by the pool
        # process before the task began, on the way from the broker to the claim.
        worker_send_task_events=False,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # This worker's queues, high-priority band first: its host's, or its Kubernetes cluster's.
        task_queues=[Queue(name) for name in worker_queues(settings)],
        task_create_missing_queues=True,
        # No Redis-side acknowledgement bookkeeping: kombu's ack emulation recorded every delivered message in an
        # `unacked` hash and index (a MULTI/EXEC pipeline) and removed it at the ack (another), about 0.6 ms of the
        # worker's main process per job, to redeliver a message whose worker died after a visibility timeout (an
        # hour). Here that redelivery would find its job taken back already: a job whose task no worker claimed
        # returns to the backlog after CLAIM_TIMEOUT_SECONDS (scheduling.requeue_unclaimed), and the claim's token
        # ignores a stale delivery. A warm shutdown still returns the messages it had reserved to their queues.
        broker_transport_options={"ack_emulation": False},
    )
    if settings.worker_executor == "kubernetes":
        # A Kubernetes task only claims and launches; the process's supervisor watches every attempt to its
        # end. One process (threads) means one supervisor, one pair of shared watches and one bound
        # (KUBERNETES_MAX_SUPERVISED) per worker. An explicit --pool still wins.
        celery.conf.worker_pool = "threads"
        celery.steps["worker"].add(SupervisedJobs)
    return celery


class SupervisedJobs(bootsteps.StartStopStep):
    """Puts what the worker's supervisor holds into the worker's stats (`celery inspect stats`, and Flower's
    /api/workers `stats`): the tasks only launch, so the running jobs are shown here."""

    def info(self, worker: Any) -> dict[str, Any]:
        from workers.context import worker_context

        runner = worker_context().runner
        supervisor = getattr(runner, "supervisor", None)
        return {"supervised": supervisor.stats()} if supervisor is not None else {}


settings = Settings.from_env()
app = create_celery_app(settings)
_membership: Any = None
_drainer: threading.Thread | None = None


@signals.setup_logging.connect
def _configure_logging(**_: Any) -> None:
    logs.configure(settings.log_level, settings.log_format)


@signals.worker_init.connect
def _contain_jobs(**_: Any) -> None:
    """Before the pool starts: set up the jobs' cgroup, kill what a previous worker on this host left running,
    and build the member launcher once (the pool's processes inherit it)."""
    if settings.worker_executor != "local":
        return
    from workers.executors import containment
    from workers.executors.launcher import launcher

    try:
        containment.sweep(containment.prepare_jobs_cgroup(settings.worker_cgroup, delegate=True))
    except Exception:  # noqa: BLE001 - the node's heartbeats sweep again; a worker that cannot start helps no one
        logging.getLogger("jobservice.worker").exception("sweeping leftover job processes failed")
    launcher(settings.worker_launcher, Path(settings.data_dir) / "bin")


@signals.worker_ready.connect
def _join_cluster(sender: Any = None, **_: Any) -> None:
    global _membership
    from workers.node import ClusterMembership, NodeMembership

    concurrency = getattr(getattr(sender, "pool", None), "limit", None) or app.conf.worker_concurrency or settings.worker_concurrency
    if settings.worker_executor == "kubernetes":
        # Slots are what the supervisor may hold, not the Celery threads (they only launch).
        _membership = ClusterMembership(settings, slots=settings.kubernetes_max_supervised, publish=app.send_task)
    else:
        _membership = NodeMembership(settings, slots=int(concurrency), worker_id=getattr(sender, "hostname", None) or settings.worker_node)
    _membership.start()


@signals.worker_shutting_down.connect
def _drain(**_: Any) -> None:
    """Warm shutdown (SIGTERM, Ctrl-C) has begun: the node drains before the pool waits for its jobs.

    This runs in the signal handler of the worker's main process; the database write runs on a thread of
    its own so that the handler returns at once (the worker_shutdown handler waits for it)."""
    global _drainer
    if _membership is None or _drainer is not None:
        return
    _drainer = threading.Thread(target=_drain_node, args=(_membership,), name="drain", daemon=True)
    _drainer.start()


def _drain_node(membership: Any) -> None:
    try:
        membership.drain()
    except Exception:  # noqa: BLE001 - the worker still stops; its jobs' leases expire and they are retried
        logging.getLogger("jobservice.worker").exception("marking the node draining failed")


@signals.worker_shutdown.connect
def _leave_cluster(**_: Any) -> None:
    if _drainer is not None:
        _drainer.join(timeout=15)
    if _membership is not None:
        _membership.stop()
