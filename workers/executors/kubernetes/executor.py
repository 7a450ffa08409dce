"""The executor: launches each attempt as one Indexed Job, re-attaches after a restart, and says which Jobs may go."""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes import client
from kubernetes.client import ApiClient, ApiException

from workers.executors.base import EndKind, JobSpec, LogSink, Outcome
from workers.executors.kubernetes import records
from workers.executors.kubernetes.calls import REQUEST_TIMEOUT, RetryPolicy, _api_message, _describe, is_transient
from workers.executors.kubernetes.execution import KubernetesExecution, Timings, _Ended
from workers.executors.kubernetes.informers import SharedInformer
from workers.executors.kubernetes.manifest import (
    ANNOTATION_ATTEMPT,
    ANNOTATION_JOB_ID,
    LABEL_MANAGED_BY,
    MANAGER,
    build_job_manifest,
    build_service_manifest,
    owner_selector,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManagedJob:
    job_id: str
    attempt: int
    name: str
    finished: str | None = None  # "Complete" or "Failed"; None while it runs
    finished_at: datetime | None = None
    deleting: bool = False


@dataclass(frozen=True)
class Retention:
    """How long finished Jobs are kept (with their pods, whose logs and events tell what happened)."""

    succeeded_seconds: float = 3600.0
    failed_seconds: float = 86400.0


def jobs_to_delete(jobs: Iterable[ManagedJob], running: set[tuple[str, int]], ours: set[tuple[str, int]],
                   now: datetime, retention: Retention) -> list[tuple[ManagedJob, str]]:
    """Which of the service's Jobs go, and why: a Job no attempt of ours owns (a true orphan) at once; a Job
    still active whose attempt is over (its worker died mid-teardown) at once; a finished Job once it has
    been kept for its retention (the failed one at least as long as the succeeded one). A running
    attempt's Job is its worker's business."""
    doomed = []
    for job in jobs:
        key = (job.job_id, job.attempt)
        if job.deleting or key in running:
            continue
        if key not in ours:
            doomed.append((job, "no attempt of the service owns it"))
        elif job.finished is None:
            doomed.append((job, f"attempt {job.attempt} is over but the Job is still active"))
        else:
            keep = retention.succeeded_seconds if job.finished == "Complete" else max(retention.failed_seconds,
                                                                                      retention.succeeded_seconds)
            age = (now - job.finished_at).total_seconds() if job.finished_at else None
            if age is None or age >= keep:
                doomed.append((job, f"{job.finished.lower()} and kept for {keep:g}s"))
    return doomed


class KubernetesExecutor:
    """Launches each attempt as one Indexed Job in `namespace` of `cluster`; re-attaches after a restart.

    `pin_to_node` puts the members on the node the service's scheduler chose (spec.node); without it the
    kube-scheduler places them and the service's node is only its capacity estimate.
    """

    name = "kubernetes"

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        cluster: str,
        gpu_resource: str = "nvidia.com/gpu",
        *,
        gang_start_timeout_seconds: float | None = None,
        ttl_seconds_after_finished: int | None = 3600,
        pin_to_node: bool = False,
        service_account_name: str | None = None,
        timings: Timings | None = None,
        retry: RetryPolicy | None = None,
        gpu_tolerations: Iterable[tuple[str, str | None, str | None]] = (("nvidia.com/gpu", None, "NoSchedule"),),
        gpu_product_label: str | None = "nvidia.com/gpu.product",
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.cluster = cluster
        self.gpu_resource = gpu_resource
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self.pin_to_node = pin_to_node
        self.service_account_name = service_account_name
        self.timings = timings or Timings()
        if gang_start_timeout_seconds is not None:
            self.timings = dataclasses.replace(self.timings, gang_start_timeout_seconds=gang_start_timeout_seconds)
        self.retry = retry or RetryPolicy()
        self.gpu_tolerations = tuple(gpu_tolerations)
        self.gpu_product_label = gpu_product_label
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._informers: tuple[SharedInformer, SharedInformer] | None = None
        self._informers_lock = threading.Lock()

    def manifest(self, spec: JobSpec) -> client.V1Job:
        return build_job_manifest(
            spec, self.namespace, self.gpu_resource, cluster=self.cluster,
            ttl_seconds_after_finished=self.ttl_seconds_after_finished,
            node_name=(spec.node or spec.nodes or None) if self.pin_to_node else None,
            service_account_name=self.service_account_name,
            gpu_tolerations=self.gpu_tolerations,
            gpu_product_label=self.gpu_product_label,
        )

    def launch(self, spec: JobSpec, logs: LogSink) -> KubernetesExecution | _Ended:
        try:
            manifest = self.manifest(spec)
        except ValueError as error:
            return _Ended(Outcome(EndKind.LAUNCH_FAILED, str(error)))
        name = manifest.metadata.name
        where = {"job_name": name, "namespace": self.namespace}
        try:
            created = self.retry.call(f"create Job {name}", lambda: self._create_job(manifest))
        except ApiException as error:
            if error.status != 409:
                return _Ended(self._launch_error(error, where))
            # A redelivered launch: this attempt's Job exists already. Watch it rather than fail.
            try:
                existing = self._find(spec)
                if existing is not None:
                    self._ensure_service(spec, existing)
                adopted = self._adopt_job(spec, logs, existing)
            except Exception as adopt_error:
                return _Ended(self._launch_error(adopt_error, where))
            if adopted is None:
                return _Ended(Outcome(EndKind.LAUNCH_FAILED, f"a Job named {name} exists but belongs to another job",
                                      details=where))
            log.info("Job %s/%s already existed; adopted it", self.namespace, name)
            return adopted
        except Exception as error:
            return _Ended(self._launch_error(error, where))
        log.info("created Job %s/%s for job %s attempt %s", self.namespace, name, spec.job_id, spec.attempt)
        try:
            self._ensure_service(spec, created)
        except Exception as error:
            # Without its Service a gang's members cannot find member 0: take the Job back rather than let it hang.
            log.error("could not create the Service of Job %s: %s", name, _describe(error))
            try:
                self.remove_job(name)
            except Exception as remove_error:  # noqa: BLE001 - the inventory sync deletes it as a stray later
                log.error("could not delete Job %s: %s", name, _describe(remove_error))
            return _Ended(self._launch_error(error, where))
        return self._track(spec, logs, name, started_at=time.time(), known_version=created.metadata.resource_version)

    def _create_job(self, manifest: client.V1Job) -> client.V1Job:
        """Create the Job; the answer is read for the metadata that follows uses (name, uid, resourceVersion):
        the client's decoding of the whole answer into its models cost more CPU than the create itself."""
        response = self._batch.create_namespaced_job(self.namespace, manifest, _preload_content=False,
                                                     _request_timeout=REQUEST_TIMEOUT)
        try:
            body = response.data
        finally:
            response.release_conn()
        meta = json.loads(body).get("metadata") or {}
        return client.V1Job(metadata=client.V1ObjectMeta(name=meta.get("name"), uid=meta.get("uid"),
                                                         resource_version=meta.get("resourceVersion")))

    def _ensure_service(self, spec: JobSpec, job: client.V1Job) -> None:
        """The gang's headless Service (none for a single member); one that exists already is fine."""
        if spec.members <= 1:
            return
        service = build_service_manifest(spec, self.namespace, job)
        try:
            self.retry.call(f"create Service {service.metadata.name}", lambda: self._core.create_namespaced_service(
                self.namespace, service, _request_timeout=REQUEST_TIMEOUT))
        except ApiException as error:
            if error.status != 409:
                raise

    @staticmethod
    def _launch_error(error: Exception, where: dict[str, Any]) -> Outcome:
        """Transient trouble that outlived the retries is LOST (the service may requeue); a refusal is final."""
        if isinstance(error, ApiException):
            details = where | {"status": error.status, "message": _api_message(error)}
            if is_transient(error):
                return Outcome(EndKind.LOST, f"Kubernetes API unavailable: {_describe(error)}", details=details)
            return Outcome(EndKind.LAUNCH_FAILED, f"Kubernetes rejected the Job: {_api_message(error)}",
                           details=details)
        if is_transient(error):
            return Outcome(EndKind.LOST, f"Kubernetes API unreachable: {_describe(error)}", details=where)
        raise error

    def adopt(self, spec: JobSpec, logs: LogSink, logs_since: datetime | None = None) -> KubernetesExecution | None:
        """Re-attach to the Job launched for (job id, attempt), found by its labels; None if there is none.

        `logs_since`: the time of the last log line already stored, so that lines are not delivered twice.
        """
        return self._adopt_job(spec, logs, self._find(spec), logs_since)

    def _find(self, spec: JobSpec) -> client.V1Job | None:
        listed = self.retry.call(f"list Jobs of {spec.job_id}", lambda: self._batch.list_namespaced_job(
            self.namespace, label_selector=owner_selector(spec.job_id, spec.attempt), _request_timeout=REQUEST_TIMEOUT))
        return next((j for j in listed.items or []
                     if (j.metadata.annotations or {}).get(ANNOTATION_JOB_ID) == spec.job_id
                     and (j.metadata.annotations or {}).get(ANNOTATION_ATTEMPT) == str(spec.attempt)), None)

    def _adopt_job(self, spec: JobSpec, logs: LogSink, job: client.V1Job | None,
                   logs_since: datetime | None = None) -> KubernetesExecution | None:
        if job is None:
            return None
        created = job.metadata.creation_timestamp
        started_at = created.timestamp() if created else time.time()
        return self._track(spec, logs, job.metadata.name, started_at, logs_since, job.metadata.resource_version)

    def list_managed_jobs(self) -> list[tuple[str, int, str]]:
        """(job id, attempt, Job name) for every Job this service manages in the namespace."""
        return [(m.job_id, m.attempt, m.name) for m in self.list_managed()]

    def list_managed(self) -> list[ManagedJob]:
        """Every Job this service manages in the namespace, with whether and when it finished."""
        listed = self.retry.call("list managed Jobs", lambda: self._batch.list_namespaced_job(
            self.namespace, label_selector=f"{LABEL_MANAGED_BY}={MANAGER}", _request_timeout=REQUEST_TIMEOUT))
        found = []
        for job in listed.items or []:
            annotations = job.metadata.annotations or {}
            attempt = annotations.get(ANNOTATION_ATTEMPT, "")
            if ANNOTATION_JOB_ID in annotations and attempt.isdigit():
                terminal = next((c for c in (job.status.conditions if job.status else None) or []
                                 if c.status == "True" and c.type in ("Complete", "Failed")), None)
                found.append(ManagedJob(
                    annotations[ANNOTATION_JOB_ID], int(attempt), job.metadata.name,
                    finished=terminal.type if terminal else None,
                    finished_at=(terminal.last_transition_time or (job.status.completion_time if job.status else None))
                    if terminal else None,
                    deleting=job.metadata.deletion_timestamp is not None,
                ))
        return found

    def remove_job(self, name: str) -> None:
        """Delete a Job (and, in the foreground, its pods) that no attempt owns any more; gone is fine."""
        try:
            self.retry.call(f"delete Job {name}", lambda: self._batch.delete_namespaced_job(
                name, self.namespace, propagation_policy="Foreground", _request_timeout=REQUEST_TIMEOUT))
        except ApiException as error:
            if error.status != 404:
                raise

    def informers(self) -> tuple[SharedInformer, SharedInformer]:
        """The shared Job and pod informers of this executor's cluster and namespace, started on first use."""
        with self._informers_lock:
            if self._informers is None:
                timeout = self.timings.watch_timeout_seconds
                self._informers = (
                    SharedInformer(f"jobs-{self.cluster}", self._batch.list_namespaced_job, self.namespace, timeout,
                                   records.Job),
                    SharedInformer(f"pods-{self.cluster}", self._core.list_namespaced_pod, self.namespace, timeout,
                                   records.Pod),
                )
            return self._informers

    def close(self) -> None:
        """Stop the shared watches (a worker process keeps them for its life)."""
        with self._informers_lock:
            informers, self._informers = self._informers, None
        for informer in informers or ():
            informer.stop()

    def _track(self, spec: JobSpec, logs: LogSink, name: str, started_at: float,
               logs_since: datetime | None = None, known_version: str | None = None) -> KubernetesExecution:
        return KubernetesExecution(self.api_client, self.namespace, name, spec, logs, started_at, self.timings,
                                   self.retry, logs_since, informers=self.informers(), known_version=known_version)
