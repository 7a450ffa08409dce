"""Slim records of the Jobs and pods the shared informers cache: only the fields the executor reads.

A decoded `V1Pod` (the client's pydantic model, every field of the API's schema, each nested object a model of
its own) took about 40 KiB and a `V1Job` about 25 KiB of heap; at 1,000 running jobs the two caches were most of
a worker's memory, and decoding them (JSON -> dict -> JSON again -> models, in `kubernetes.watch`) most of its
CPU. The informers instead read the API's JSON once and keep these records (`__slots__`, no per-object dict),
about 1 KiB for a pod. They carry the attribute names of the client's models for the fields they keep
(`pod.status.container_statuses[0].state.terminated.exit_code` ...), so `outcomes` reads either.

What is kept, and why:
- metadata: name, resourceVersion (the cache's version), deletionTimestamp (a member's exit during a teardown),
  the owner labels (which attempt an object belongs to) and the completion index (which member a pod is);
- a Job's conditions (type, status, reason, message): its verdict;
- a pod's node (where each member ran), its containers' images (what to report when a pull fails), its phase,
  reason and message, its conditions (PodScheduled's message while waiting, DisruptionTarget), and each
  container's name, image and state (running; terminated with exit code, reason, message; waiting with
  reason and message).
"""
from __future__ import annotations

import sys
from typing import Any

from workers.executors.kubernetes.manifest import COMPLETION_INDEX, LABEL_ATTEMPT, LABEL_JOB_ID

Raw = dict[str, Any]


def _word(value: Any) -> Any:
    """Phases, condition types and statuses, reasons: a few distinct values, shared rather than one copy each."""
    return sys.intern(value) if isinstance(value, str) and len(value) <= 64 else value


class Meta:
    __slots__ = ("name", "resource_version", "deletion_timestamp", "owner", "completion_index")

    def __init__(self, raw: Raw) -> None:
        labels = raw.get("labels") or {}
        annotations = raw.get("annotations") or {}
        self.name: str | None = raw.get("name")
        self.resource_version: str | None = raw.get("resourceVersion")
        self.deletion_timestamp: str | None = raw.get("deletionTimestamp")
        job_id, attempt = labels.get(LABEL_JOB_ID), labels.get(LABEL_ATTEMPT)
        self.owner: tuple[str, str] | None = None
        if job_id is not None and attempt is not None:
            self.owner = (job_id, _word(attempt))
        index = annotations.get(COMPLETION_INDEX, labels.get(COMPLETION_INDEX))
        self.completion_index: str | None = _word(index)

    # The models' mappings, rebuilt from what is kept (read once per event, not stored per object).
    @property
    def labels(self) -> dict[str, str]:
        labels = {LABEL_JOB_ID: self.owner[0], LABEL_ATTEMPT: self.owner[1]} if self.owner else {}
        return labels | ({COMPLETION_INDEX: self.completion_index} if self.completion_index is not None else {})

    @property
    def annotations(self) -> dict[str, str]:
        return {COMPLETION_INDEX: self.completion_index} if self.completion_index is not None else {}


class Condition:
    __slots__ = ("type", "status", "reason", "message")

    def __init__(self, raw: Raw) -> None:
        self.type: str | None = _word(raw.get("type"))
        self.status: str | None = _word(raw.get("status"))
        self.reason: str | None = _word(raw.get("reason"))
        self.message: str | None = raw.get("message")


class StateDetail:
    """A container's `terminated` or `waiting` state (`exit_code` None for waiting)."""

    __slots__ = ("exit_code", "reason", "message")

    def __init__(self, raw: Raw) -> None:
        self.exit_code: int | None = raw.get("exitCode")
        self.reason: str | None = _word(raw.get("reason"))
        self.message: str | None = raw.get("message")


class ContainerState:
    __slots__ = ("running", "terminated", "waiting")

    def __init__(self, raw: Raw) -> None:
        # Only whether it runs is read (not since when).
        self.running: bool = raw.get("running") is not None
        self.terminated = StateDetail(raw["terminated"]) if raw.get("terminated") is not None else None
        self.waiting = StateDetail(raw["waiting"]) if raw.get("waiting") is not None else None


class ContainerStatus:
    __slots__ = ("name", "image", "state")

    def __init__(self, raw: Raw) -> None:
        self.name: str | None = _word(raw.get("name"))
        self.image: str | None = _word(raw.get("image"))
        self.state = ContainerState(raw["state"]) if raw.get("state") is not None else None


class Container:
    __slots__ = ("name", "image")

    def __init__(self, raw: Raw) -> None:
        self.name: str | None = _word(raw.get("name"))
        self.image: str | None = _word(raw.get("image"))


class PodSpec:
    __slots__ = ("node_name", "containers")

    def __init__(self, raw: Raw) -> None:
        self.node_name: str | None = _word(raw.get("nodeName"))
        self.containers = tuple(Container(c) for c in raw.get("containers") or ())


class PodStatus:
    __slots__ = ("phase", "reason", "message", "conditions", "container_statuses", "init_container_statuses")

    def __init__(self, raw: Raw) -> None:
        self.phase: str | None = _word(raw.get("phase"))
        self.reason: str | None = _word(raw.get("reason"))
        self.message: str | None = raw.get("message")
        self.conditions = tuple(Condition(c) for c in raw.get("conditions") or ())
        self.container_statuses = tuple(ContainerStatus(c) for c in raw.get("containerStatuses") or ())
        self.init_container_statuses = tuple(ContainerStatus(c) for c in raw.get("initContainerStatuses") or ())


class Pod:
    __slots__ = ("metadata", "spec", "status")

    def __init__(self, raw: Raw) -> None:
        self.metadata = Meta(raw.get("metadata") or {})
        self.spec = PodSpec(raw.get("spec") or {})
        self.status = PodStatus(raw.get("status") or {})


class JobStatus:
    __slots__ = ("conditions",)

    def __init__(self, raw: Raw) -> None:
        self.conditions = tuple(Condition(c) for c in raw.get("conditions") or ())


class Job:
    __slots__ = ("metadata", "status")

    def __init__(self, raw: Raw) -> None:
        self.metadata = Meta(raw.get("metadata") or {})
        self.status = JobStatus(raw.get("status") or {})
