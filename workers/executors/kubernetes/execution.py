"""One launched (or adopted) Job: watched, its members' logs followed, ended by an outcome."""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client import ApiClient, ApiException

from workers.executors.base import EndKind, JobSpec, LogLine, LogSink, Outcome
from workers.executors.kubernetes import records
from workers.executors.kubernetes.calls import REQUEST_TIMEOUT, RetryPolicy, _describe
from workers.executors.kubernetes.logs import _LogFollower
from workers.executors.kubernetes.informers import SharedInformer, version_at_least
from workers.executors.kubernetes.watches import list_raw
from workers.executors.kubernetes.manifest import label_value, owner_selector
from workers.executors.kubernetes.outcomes import (
    Verdict,
    _container_statuses,
    job_verdict,
    make_outcome,
    member_index,
    pod_failure_details,
    pod_verdict,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timings:
    gang_start_timeout_seconds: float = 600.0  # all members Running within this, or LOST and torn down
    watch_timeout_seconds: int = 300  # server-side end of each watch; it is then resumed
    teardown_grace_seconds: float = 60.0  # report a teardown's outcome even if the Job is not gone by then
    log_drain_seconds: float = 10.0  # after the outcome is known, wait this long at most for the last lines
    deadline_grace_seconds: float = 60.0  # backstop if the cluster does not enforce activeDeadlineSeconds
    log_idle_timeout_seconds: float = 60.0  # reconnect a log stream quiet this long


@dataclass
class _Member:
    pod: records.Pod
    index: int
    deleted: bool = False
    started: bool = False
    failure: tuple[int, Verdict, dict[str, Any]] | None = None  # (order seen, verdict, details)
    follower: _LogFollower | None = None

    @property
    def ended(self) -> bool:
        return self.deleted or (self.pod.status is not None and self.pod.status.phase in ("Succeeded", "Failed"))


@dataclass
class _Teardown:
    outcome: Outcome
    since: float  # monotonic
    by_cancel: bool
    accepted: bool = False  # the API accepted the delete (or the Job was already gone)
    last_try: float = 0.0


class KubernetesExecution:
    """A launched (or adopted) Kubernetes Job: watched, its members' logs followed, ended by outcome."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        name: str,
        spec: JobSpec,
        logs: LogSink,
        started_at: float,
        timings: Timings,
        retry: RetryPolicy,
        logs_since: datetime | None = None,
        *,
        informers: tuple[SharedInformer, SharedInformer],
        known_version: str | None = None,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.spec = spec
        self._api = api_client
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._sink = logs
        self._started_at = started_at  # wall clock (the Job's creation, when adopted)
        self._timings = timings
        self._retry = retry
        self._logs_since = logs_since
        self._lock = threading.RLock()
        self._sink_lock = threading.Lock()
        self._order = itertools.count()
        self._job: records.Job | None = None
        self._job_gone = False
        self._members: dict[str, _Member] = {}
        self._gang_formed = False
        self._pods_synced = False  # the pod watch has listed once: "no members running" means something
        self._pods_confirmed = False  # pods read afresh since the Job ended (see _confirm_pods)
        self._confirm_failures = 0
        self._teardown: _Teardown | None = None
        self._known_at: float | None = None  # monotonic time the outcome became known
        self._final: Outcome | None = None
        self._closed = False
        # The Job as written by its creation (or read at adoption): a cache at least this new that lacks it
        # means it is gone; an older one only has not seen it yet.
        self._known_version = known_version
        # State comes from the executor's shared informers (one watch of Jobs, one of pods, per cluster).
        self._informers = informers
        self._key = (label_value(spec.job_id), str(spec.attempt))
        # Called (without blocking) after every change the informers bring: a supervising loop polls this
        # execution soon rather than on its next sweep.
        self.on_change: Callable[[], None] | None = None
        jobs, pods = informers
        jobs.subscribe(self._key, self, self._sync_job, self._job_event)
        pods.subscribe(self._key, self, self._sync_pods, self._pod_event)

    # -- the Execution protocol -------------------------------------------------------------------------

    def poll(self) -> Outcome | None:
        with self._lock:
            if self._final is not None:
                return self._final
            confirm = (self._teardown is None and not self._pods_confirmed and self._job is not None
                       and job_verdict(self._job) is not None)
        if confirm:
            self._confirm_pods()
        delete = False
        with self._lock:
            if self._final is not None:
                return self._final
            now = time.monotonic()
            if self._teardown is not None:
                teardown = self._teardown
                if not (self._job_gone or now - teardown.since >= self._timings.teardown_grace_seconds):
                    delete = not teardown.accepted and now - teardown.last_try >= 2.0
                    outcome = None
                else:
                    outcome = teardown.outcome
            else:
                decided = self._decide()
                if decided is None:
                    return None
                outcome, tear_down = decided
                if tear_down:
                    self._teardown = _Teardown(outcome, since=now, by_cancel=False)
                    delete, outcome = True, None
            if outcome is not None:
                if self._known_at is None:
                    self._known_at = now
                if not self._logs_drained() and now - self._known_at < self._timings.log_drain_seconds:
                    return None
                self._final = outcome
        if delete:
            self._delete_job()
            return None
        if outcome is not None:
            log.info("job %s attempt %s (%s): %s", self.spec.job_id, self.spec.attempt, self.name, outcome.reason)
            self.close()
        return outcome

    def cancel(self, kind: EndKind = EndKind.CANCELLED, reason: str = "cancelled") -> None:
        with self._lock:
            if self._final is not None:
                return  # already reported: nothing left to stop
            if self._teardown is None or not self._teardown.by_cancel:
                outcome = Outcome(kind=kind, reason=reason, details=self._job_details())
                self._teardown = _Teardown(outcome, since=time.monotonic(), by_cancel=True,
                                           accepted=self._teardown.accepted if self._teardown else False)
            if self._teardown.accepted:
                return
        self._delete_job()

    def close(self) -> None:
        """Stop watching and following logs (done by itself once the outcome is reported)."""
        with self._lock:
            self._closed = True
            followers = [m.follower for m in self._members.values() if m.follower is not None]
        for informer in self._informers:
            informer.unsubscribe(self._key, self)
        for follower in followers:
            follower.stop()

    def watch_stats(self) -> dict[str, int]:
        return {"lists": sum(i.lists for i in self._informers), "resumes": sum(i.resumes for i in self._informers)}

    # -- deciding ---------------------------------------------------------------------------------------

    def _decide(self) -> tuple[Outcome, bool] | None:
        """(outcome, tear the Job down first?) once there is one. Called under the lock."""
        if self._job is not None and self._pods_confirmed and (terminal := job_verdict(self._job)) is not None:
            verdict, condition = terminal
            culprit = self._culprit()
            if verdict.authoritative or culprit is None:
                said = {"reason": condition.reason, "message": condition.message, "timeout": self.spec.timeout_seconds}
                details = self._job_details() | {k: v for k, v in said.items() if v is not None}
                return make_outcome(verdict, details), False
            _, member_verdict, member_details = culprit
            return make_outcome(member_verdict, self._job_details() | member_details), False
        stuck = next((m.failure for m in self._members.values() if m.failure and m.failure[1].fail_fast), None)
        if stuck is not None:
            return make_outcome(stuck[1], self._job_details() | stuck[2]), True
        if self._job_gone:
            return Outcome(EndKind.LOST, f"Kubernetes Job {self.name} was deleted outside the service",
                           details=self._job_details()), False
        elapsed = time.time() - self._started_at
        if not self._gang_formed and self._pods_synced:
            running = len({m.index for m in self._members.values() if m.started})
            if running >= self.spec.members:
                self._gang_formed = True
            elif elapsed >= self._timings.gang_start_timeout_seconds:
                waiting = {m.pod.metadata.name: _scheduling_message(m.pod)
                           for m in self._members.values() if not m.started}
                reason = (f"gang incomplete: {running} of {self.spec.members} members running after "
                          f"{self._timings.gang_start_timeout_seconds:g}s")
                return Outcome(EndKind.UNPLACED, reason, details=self._job_details() | {"waiting": waiting}), True
        timeout = self.spec.timeout_seconds
        if timeout and elapsed >= timeout + self._timings.deadline_grace_seconds:
            return Outcome(EndKind.TIMEOUT, f"exceeded its time limit of {timeout}s (Job deadline not enforced)",
                           details=self._job_details()), True
        return None

    def _confirm_pods(self) -> None:
        """Once the Job has ended, read its pods afresh before judging: the two watches are separate streams,
        and the pod one may lag behind the Job's, which would lose the culprit member and its last log lines."""
        try:
            pods, _ = self._retry.call(f"list pods of {self.name}", lambda: list_raw(
                self._core.list_namespaced_pod, self.namespace, records.Pod,
                label_selector=owner_selector(self.spec.job_id, self.spec.attempt)))
        except Exception as error:
            with self._lock:
                self._confirm_failures += 1
                # Judge from what the watch has seen rather than wait on an API that does not answer.
                self._pods_confirmed = self._confirm_failures >= 3
            log.warning("could not list pods of Job %s: %s", self.name, _describe(error))
            return
        self._sync_pods(pods)
        with self._lock:
            self._pods_confirmed = True

    def _culprit(self) -> tuple[int, Verdict, dict[str, Any]] | None:
        """The member that failed first: the one that failed the gang, not those killed after it."""
        failures = [m.failure for m in self._members.values() if m.failure is not None]
        return min(failures, key=lambda f: f[0]) if failures else None

    def _job_details(self) -> dict[str, Any]:
        # Where each member really ran: a spread gang is placed by the kube-scheduler, member by member.
        nodes = {m.index: m.pod.spec.node_name for m in self._members.values() if m.pod.spec and m.pod.spec.node_name}
        return {"job_name": self.name, "namespace": self.namespace, "members": self.spec.members,
                "member_nodes": {str(index): nodes[index] for index in sorted(nodes)}}

    def _logs_drained(self) -> bool:
        return all(m.ended and (m.follower is None or not m.follower.is_alive()) for m in self._members.values())

    def _delete_job(self) -> None:
        with self._lock:
            if self._teardown is not None:
                self._teardown.last_try = time.monotonic()
        try:
            # Foreground: the Job stays (with a deletionTimestamp) until its pods are gone, so "Job gone" means
            # every member has stopped.
            self._retry.call(f"delete Job {self.name}", lambda: self._batch.delete_namespaced_job(
                self.name, self.namespace, propagation_policy="Foreground", _request_timeout=REQUEST_TIMEOUT))
            accepted, gone = True, False
        except ApiException as error:
            accepted = gone = error.status == 404  # already gone: what we wanted
            if not gone:
                log.error("could not delete Job %s: %s (will retry)", self.name, _describe(error))
        except Exception as error:
            accepted = gone = False
            log.error("could not delete Job %s: %s (will retry)", self.name, _describe(error))
        with self._lock:
            if self._teardown is not None:
                self._teardown.accepted = self._teardown.accepted or accepted
            self._job_gone = self._job_gone or gone

    # -- what the watches report ------------------------------------------------------------------------

    def _sync_job(self, items: list[records.Job], version: str | None = None) -> None:
        with self._lock:
            current = next((j for j in items if j.metadata.name == self.name), None)
            if current is None:
                if version_at_least(version, self._known_version):
                    self._job_gone = True
            else:
                self._job = current
        self._changed()

    def _job_event(self, kind: str, job: records.Job) -> None:
        if job.metadata.name != self.name:
            return
        with self._lock:
            if kind == "DELETED":
                self._job_gone = True
            else:
                self._job = job
        self._changed()

    def _sync_pods(self, items: list[records.Pod], version: str | None = None) -> None:
        with self._lock:
            self._pods_synced = True
            listed = {p.metadata.name for p in items}
            for name, member in self._members.items():
                if name not in listed:
                    member.deleted = True
            for pod in items:
                self._observe(pod, deleted=False)
        self._changed()

    def _pod_event(self, kind: str, pod: records.Pod) -> None:
        with self._lock:
            self._observe(pod, deleted=kind == "DELETED")
        self._changed()

    def _changed(self) -> None:
        notify = self.on_change
        if notify is not None:
            notify()

    def _observe(self, pod: records.Pod, deleted: bool) -> None:
        name = pod.metadata.name
        member = self._members.get(name)
        if member is None:
            member = self._members[name] = _Member(pod=pod, index=member_index(pod))
        member.pod = pod
        member.deleted = member.deleted or deleted
        if any(c.state and (c.state.running or c.state.terminated) for c in _container_statuses(pod)):
            member.started = True
        if member.failure is None and (found := pod_verdict(pod)) is not None:
            source, verdict = found
            # A member's exit while it is being deleted (SIGTERM from a teardown, the deadline, a failed gang
            # peer) is a consequence; evictions and disruptions are reported even then.
            if not (source == "terminated" and pod.metadata.deletion_timestamp is not None):
                member.failure = (next(self._order), verdict, pod_failure_details(pod))
        if member.started and member.follower is None and not self._closed and not member.deleted:
            member.follower = _LogFollower(
                self._api, self.namespace, name, member.index, self._emit,
                finished=lambda m=member: self._member_ended(m),
                since=self._logs_since, idle_timeout=self._timings.log_idle_timeout_seconds,
                on_exit=self._changed,
            )
            member.follower.start()

    def _member_ended(self, member: _Member) -> bool:
        with self._lock:
            return member.ended

    def _emit(self, lines: list[LogLine]) -> None:
        with self._sink_lock:
            if self._closed:
                return
            try:
                self._sink(lines)
            except Exception:  # a failing sink must not kill the log stream
                log.exception("log sink failed for job %s", self.spec.job_id)


def _scheduling_message(pod: records.Pod) -> str:
    for condition in (pod.status.conditions if pod.status else None) or []:
        if condition.type == "PodScheduled" and condition.status != "True":
            return f"{condition.reason}: {condition.message}"
    statuses = _container_statuses(pod)
    waiting = next((c.state.waiting for c in statuses if c.state and c.state.waiting), None)
    return f"{waiting.reason}: {waiting.message}" if waiting else (pod.status.phase if pod.status else "Unknown")


class _Ended:
    """An execution that ended before it started (rejected manifest, API unavailable)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def poll(self) -> Outcome | None:
        return self.outcome

    def cancel(self, kind: EndKind = EndKind.CANCELLED, reason: str = "cancelled") -> None:
        pass  # nothing runs
