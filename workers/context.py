"""Per-process worker state, built after the prefork pool forks (database connections don't survive a fork)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from app.db import Database
from config import Settings
from workers.executors.base import Executor
from workers.runner import Runner

WORKER_PING_IDLE_AFTER_SECONDS = 1.0


@dataclass
class WorkerContext:
    settings: Settings
    database: Database
    runner: Runner


def build_executor(settings: Settings) -> Executor:
    """The executor this worker runs jobs with: processes on its host, or Jobs on its Kubernetes cluster."""
    if settings.worker_executor == "kubernetes":
        from app.kube import build_api_client
        from workers.executors.kubernetes import KubernetesExecutor

        cluster = served_cluster(settings)
        context = dict(settings.kubernetes_clusters)[cluster]
        return KubernetesExecutor(
            build_api_client(settings.kubeconfig if context else None, context,
                             qps=settings.kubernetes_qps, burst=settings.kubernetes_burst),
            settings.kubernetes_namespace,
            cluster,
            settings.kubernetes_gpu_resource,
            gang_start_timeout_seconds=settings.gang_start_timeout_seconds,
            # The scheduler counts capacity per node: a single-node placement is pinned there.
            pin_to_node=True,
            service_account_name=settings.kubernetes_service_account,
            # The cluster's TTL controller is the backstop; the inventory sync deletes succeeded Jobs sooner.
            ttl_seconds_after_finished=int(settings.kubernetes_job_ttl_failed_seconds),
            gpu_tolerations=settings.kubernetes_gpu_tolerations,
            gpu_product_label=settings.kubernetes_gpu_product_label,
        )
    if settings.worker_executor != "local":
        raise ValueError(f"WORKER_EXECUTOR={settings.worker_executor!r}: use local or kubernetes")
    from workers.executors.launcher import launcher
    from workers.executors.local import LocalExecutor

    return LocalExecutor(
        settings.worker_workdir, settings.kill_grace_seconds, cgroup=settings.worker_cgroup,
        launcher=launcher(settings.worker_launcher, Path(settings.data_dir) / "bin"),
    )


def served_cluster(settings: Settings) -> str:
    names = [name for name, _ in settings.kubernetes_clusters]
    cluster = settings.worker_cluster or (names[0] if len(names) == 1 else None)
    if cluster not in names:
        raise ValueError(f"WORKER_CLUSTER={settings.worker_cluster!r} is not one of KUBERNETES_CLUSTERS ({', '.join(names) or 'none'})")
    return cluster


@lru_cache(maxsize=None)
def _context_for(pid: int) -> WorkerContext:
    settings = Settings.from_env()
    # A Kubernetes worker's one process serves its launch threads and its supervisor's (leases, logs, reports).
    pool_size = 5 if settings.worker_executor == "kubernetes" else 2
    # Every transaction of the runner and the supervisor is retried on a connection error (Database.retrying), so a
    # connection in use a moment ago is not pinged first: a round trip less before each claim and end report.
    database = Database(settings.database_url or "", pool_size=pool_size, application_name=f"jobservice-worker/{settings.worker_node}",
                        ping_idle_after=WORKER_PING_IDLE_AFTER_SECONDS)
    worker_id = f"worker-{settings.worker_node}-{pid}"
    if settings.worker_executor == "kubernetes":
        from workers.supervisor import SupervisingRunner

        # Kubernetes attempts are supervised by one loop per process, not watched by the task's thread.
        runner: Runner = SupervisingRunner(settings, database, build_executor(settings), worker_id=worker_id)
    else:
        runner = Runner(settings, database, build_executor(settings), worker_id=worker_id)
    return WorkerContext(settings, database, runner)


def worker_context() -> WorkerContext:
    return _context_for(os.getpid())
