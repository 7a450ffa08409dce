"""From pods and Jobs to outcomes: tables from what the cluster says to an Outcome, and pure pod -> details."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from workers.executors.base import EndKind, Outcome
from workers.executors.kubernetes import records
from workers.executors.kubernetes.manifest import COMPLETION_INDEX

# The informers' slim records (`records`) or the client's models: the functions read the fields both carry.
PodLike = records.Pod | client.V1Pod
JobLike = records.Job | client.V1Job


def member_index(pod: PodLike) -> int:
    meta = pod.metadata
    raw = (meta.annotations or {}).get(COMPLETION_INDEX) or (meta.labels or {}).get(COMPLETION_INDEX)
    return int(raw) if raw is not None and raw.isdigit() else 0


def _container_statuses(pod: PodLike) -> list[Any]:
    status = pod.status
    if status is None:
        return []
    return list(status.init_container_statuses or []) + list(status.container_statuses or [])


def pod_failure_details(pod: PodLike) -> dict[str, Any]:
    """What went wrong with a pod, for Outcome.details: the most telling container, its exit code, reason and
    message (a pod-level reason such as Evicted says more than the container's), and where it ran."""
    status = pod.status or client.V1PodStatus()
    details: dict[str, Any] = {
        "pod": pod.metadata.name,
        "member": member_index(pod),
        "node": pod.spec.node_name if pod.spec else None,
        "phase": status.phase,
        "container": None,
        "image": None,
        "exit_code": None,
        "reason": status.reason,
        "message": status.message,
    }
    statuses = _container_statuses(pod)
    failed = [c for c in statuses if c.state and c.state.terminated and c.state.terminated.exit_code != 0]
    stuck = [c for c in statuses if c.state and c.state.waiting and c.state.waiting.reason
             not in (None, "ContainerCreating", "PodInitializing")]
    telling = (failed or stuck or [None])[0]
    if telling is not None:
        state = telling.state.terminated or telling.state.waiting
        details["container"] = telling.name
        details["image"] = telling.image
        details["exit_code"] = getattr(state, "exit_code", None)
        details["reason"] = status.reason or state.reason
        details["message"] = status.message or state.message
    if details["image"] is None and pod.spec and pod.spec.containers:
        details["image"] = pod.spec.containers[0].image
    return details


@dataclass(frozen=True)
class Verdict:
    kind: EndKind
    reason: str  # a str.format template over the details
    exit_code: int | None = None  # fixed exit code; else EXITED verdicts take the member's
    fail_fast: bool = False  # tear the Job down now: waiting will not help
    authoritative: bool = False  # a Job verdict that member failures do not override


_IMAGE = Verdict(EndKind.LAUNCH_FAILED, "member {member} cannot pull image {image}: {reason}: {message}",
                 fail_fast=True)

# What a member's pod says, keyed by (where the fact is, its reason); "*" stands for any reason.
POD_VERDICTS: dict[tuple[str, str], Verdict] = {
    ("pod", "Evicted"): Verdict(EndKind.LOST, "member {member} was evicted from node {node}: {message}"),
    ("pod", "*"): Verdict(EndKind.LOST, "member {member} failed on node {node}: {reason}: {message}"),
    ("disruption", "*"): Verdict(EndKind.LOST, "member {member} was disrupted on node {node}: {reason}: {message}"),
    ("waiting", "ErrImagePull"): _IMAGE,
    ("waiting", "ImagePullBackOff"): _IMAGE,
    ("waiting", "InvalidImageName"): _IMAGE,
    ("waiting", "CreateContainerConfigError"): Verdict(
        EndKind.LAUNCH_FAILED, "member {member} cannot start: {reason}: {message}", fail_fast=True
    ),
    ("terminated", "OOMKilled"): Verdict(
        EndKind.EXITED, "member {member} ran out of memory (OOMKilled, exit code {exit_code})"
    ),
    ("terminated", "*"): Verdict(EndKind.EXITED, "member {member} exited with code {exit_code}"),
}

# What the Job's terminal condition says, keyed by (condition type, reason).
JOB_VERDICTS: dict[tuple[str, str], Verdict] = {
    ("Complete", "*"): Verdict(EndKind.EXITED, "completed", exit_code=0, authoritative=True),
    # The deadline kills every member; their exit codes are its consequence, not its cause.
    ("Failed", "DeadlineExceeded"): Verdict(
        EndKind.TIMEOUT, "exceeded its time limit of {timeout}s: {message}", authoritative=True
    ),
    ("Failed", "*"): Verdict(EndKind.LOST, "Kubernetes Job failed: {reason}: {message}"),
}


def _lookup(table: dict[tuple[str, str], Verdict], source: str, reason: str | None) -> Verdict | None:
    return table.get((source, reason or "")) or table.get((source, "*"))


def pod_facts(pod: PodLike) -> Iterator[tuple[str, str]]:
    """What a pod says about itself, most telling first, as keys into POD_VERDICTS."""
    status = pod.status or client.V1PodStatus()
    if status.phase == "Failed" and status.reason:
        yield "pod", status.reason
    for condition in status.conditions or []:
        if condition.type == "DisruptionTarget" and condition.status == "True":
            yield "disruption", condition.reason or ""
    for container in _container_statuses(pod):
        state = container.state
        if state and state.waiting and state.waiting.reason:
            yield "waiting", state.waiting.reason
        if state and state.terminated and state.terminated.exit_code != 0:
            yield "terminated", state.terminated.reason or ""


def pod_verdict(pod: PodLike) -> tuple[str, Verdict] | None:
    """The first fact of the pod that the table knows, with where it was found."""
    for source, reason in pod_facts(pod):
        verdict = _lookup(POD_VERDICTS, source, reason)
        if verdict is not None:
            return source, verdict
    return None


def job_verdict(job: JobLike) -> tuple[Verdict, Any] | None:
    """The Job's terminal condition (Complete or Failed) and what it means; None while it runs."""
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.status == "True" and condition.type in ("Complete", "Failed"):
            verdict = _lookup(JOB_VERDICTS, condition.type, condition.reason)
            if verdict is not None:
                return verdict, condition
    return None


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def make_outcome(verdict: Verdict, details: dict[str, Any]) -> Outcome:
    exit_code = verdict.exit_code
    if exit_code is None and verdict.kind == EndKind.EXITED:
        exit_code = details.get("exit_code")
    return Outcome(kind=verdict.kind, reason=verdict.reason.format_map(_Fields(details)), exit_code=exit_code,
                   details=details)
