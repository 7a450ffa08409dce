"""Where a worker's jobs run, as the scheduler sees it.

A local worker registers its host as a node of the `local` cluster and heartbeats. A Kubernetes worker
copies its cluster's nodes from the live API into the node registry, re-adopts the running jobs that no
worker watches any more (after a restart), and deletes the Kubernetes Jobs no attempt owns.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from app import heartbeat
from app.db import Database
from app.domain import execution, nodes
from app.domain.capacity import LOCAL_CLUSTER
from app.domain.quantities import cpu_to_millis, format_bytes, format_millis, memory_to_bytes
from config import Settings
from workers.executors import containment
from workers.gpus import host_resources

log = logging.getLogger("jobservice.worker")


class Membership:
    """Joins at start, then refreshes every `interval` seconds on a thread of the worker's main process."""

    interval: float

    def __init__(self, settings: Settings, slots: int) -> None:
        self.settings = settings
        self.slots = slots
        self.database = Database(settings.database_url or "", pool_size=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    def start(self) -> None:
        self.join()
        heartbeat.touch(heartbeat.path_for(self.settings, "worker"))
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
                heartbeat.touch(heartbeat.path_for(self.settings, "worker"))
            except Exception:  # noqa: BLE001 - a database or API server blip: the next round retries
                log.exception("%s refresh failed", type(self).__name__)

    def stop(self) -> None:
        """Leave at worker shutdown: the refresh thread ends first, so that no refresh joins again after `leave`."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, self.interval))
        try:
            self.leave()
        finally:
            self.database.dispose()

    def join(self) -> None:
        raise NotImplementedError

    def refresh(self) -> None:
        raise NotImplementedError

    def leave(self) -> None:
        """What a clean stop undoes; nothing by default (a Kubernetes cluster's nodes outlive its worker)."""

    def drain(self) -> None:
        """The worker is stopping (warm shutdown): nothing by default (a Kubernetes job outlives its worker)."""


class NodeMembership(Membership):
    """This host as a node of the `local` cluster, kept alive by heartbeats."""

    def __init__(self, settings: Settings, slots: int, worker_id: str) -> None:
        super().__init__(settings, slots)
        self.interval = max(1.0, settings.node_lease_seconds / 3)
        self.worker_id = worker_id
        self._drained = False
        self._prior: nodes.PriorState | None = None

    def join(self) -> None:
        s = self.settings
        resources = host_resources(
            gpus=s.worker_gpus,
            gpu_count=s.worker_gpu_count,
            gpu_type=s.worker_gpu_type,
            cpu_millis=cpu_to_millis(s.worker_cpu) if s.worker_cpu else None,
            memory_bytes=memory_to_bytes(s.worker_memory) if s.worker_memory else None,
            nvidia_smi=s.nvidia_smi,
        )
        with self.database.session() as session:
            execution.register_node(
                session, cluster=LOCAL_CLUSTER, name=s.worker_node, gpu_indices=resources.gpu_indices,
                gpu_type=resources.gpu_type, cpu_millis=resources.cpu_millis, memory_bytes=resources.memory_bytes,
                slots=self.slots, pool=s.worker_pool,
            )
        with self.database.session() as session:
            if nodes.recover_shutdown_drain(session, LOCAL_CLUSTER, s.worker_node, actor=self.worker_id):
                log.warning("node %s was left draining by a worker that did not finish stopping: drain undone", s.worker_node)
        log.info(
            "node %s registered in pool %s: GPUs %s (%s), %s CPU, %s memory, %d slots",
            s.worker_node, s.worker_pool, resources.gpu_indices, resources.gpu_type, format_millis(resources.cpu_millis),
            format_bytes(resources.memory_bytes), self.slots,
        )

    def refresh(self) -> None:
        with self.database.session() as session:
            known = execution.node_heartbeat(session, LOCAL_CLUSTER, self.settings.worker_node)
        if not known:  # the row was removed (an operator, a reset): join again
            self.join()
        # A pool process that died (OOM killer, crash) leaves its job's escaped processes behind.
        containment.sweep(containment.find_jobs_cgroup(self.settings.worker_cgroup))

    def drain(self) -> None:
        """Mark this node draining at once: the scheduler places nothing more here, queued jobs go back to the
        backlog, and the running ones get WORKER_DRAIN_SECONDS before their runners stop and requeue them."""
        if self._drained:
            return
        self._drained = True
        s = self.settings
        self._prior = self.database.retrying(
            lambda session: nodes.drain_for_shutdown(
                session, LOCAL_CLUSTER, s.worker_node, actor=self.worker_id, grace_seconds=s.worker_drain_seconds
            ),
            what="marking the node draining", give_up_after=10.0,
        )
        log.info("node %s draining: running jobs have %gs to finish", s.worker_node, s.worker_drain_seconds)

    def leave(self) -> None:
        if not self._drained:
            with self.database.session() as session:
                execution.deregister_node(session, LOCAL_CLUSTER, self.settings.worker_node)
            return
        with self.database.session() as session:
            nodes.leave_after_shutdown(session, LOCAL_CLUSTER, self.settings.worker_node, actor=self.worker_id, prior=self._prior)


class ClusterMembership(Membership):
    """A Kubernetes cluster's nodes copied into the registry; silent jobs adopted; orphaned Jobs deleted."""

    def __init__(self, settings: Settings, slots: int, publish: Callable[..., object]) -> None:
        from workers.context import build_executor, served_cluster

        super().__init__(settings, slots)
        self.interval = settings.inventory_sync_seconds
        self.publish = publish
        self.cluster = served_cluster(settings)
        self.executor = build_executor(settings)

    def join(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        from app.kube import read_inventory

        s = self.settings
        inventory = read_inventory(self.executor.api_client, self.cluster, s.kubernetes_gpu_resource, s.kubernetes_gpu_product_label)
        rows = [
            {
                "name": n.name,
                # What others' pods take is gone; the service's own jobs are held by the scheduler itself.
                "gpu_indices": list(range(max(0, n.gpu_allocatable - n.foreign_gpu_used))),
                "gpu_type": n.gpu_type,
                "cpu_millis": max(0, n.cpu_millis - n.foreign_cpu_used_millis),
                "memory_bytes": max(0, n.memory_bytes - n.foreign_memory_used_bytes),
                "slots": self.slots,
                "ready": n.ready and n.schedulable,
                "pool": s.worker_pool,
            }
            for n in inventory
        ]
        with self.database.session() as session:
            execution.sync_cluster_nodes(session, self.cluster, rows)
        self._adopt_silent_jobs()
        self._remove_orphans()

    def _adopt_silent_jobs(self) -> None:
        from app.domain.scheduling import ADOPT_TASK, broker_queue
        from app.domain.jobs import utcnow

        silent_since = utcnow() - timedelta(seconds=2 * self.settings.job_heartbeat_seconds)
        with self.database.session() as session:
            silent = execution.adoptable(session, self.cluster, silent_since)
        queue = broker_queue(self.settings.queues[0].name, self.cluster, None)
        for job_id, token in silent:
            log.warning("job watched by no worker: adopting it", extra={"job_id": job_id})
            self.publish(ADOPT_TASK, args=[job_id, token], queue=queue)

    def _remove_orphans(self) -> None:
        """Finished Jobs stay for their retention (their pods tell what happened); true orphans go at once."""
        from datetime import UTC, datetime

        from workers.executors.kubernetes import Retention, jobs_to_delete

        managed = self.executor.list_managed()
        pairs = sorted({(m.job_id, m.attempt) for m in managed})
        with self.database.session() as session:
            running = set(pairs) - execution.orphaned_attempts(session, pairs)
            ours = execution.attempts_of_ours(session, pairs)
        retention = Retention(self.settings.kubernetes_job_ttl_succeeded_seconds, self.settings.kubernetes_job_ttl_failed_seconds)
        for job, why in jobs_to_delete(managed, running, ours, datetime.now(UTC), retention):
            log.info("deleting Kubernetes Job %s: %s", job.name, why, extra={"job_id": job.job_id})
            self.executor.remove_job(job.name)
