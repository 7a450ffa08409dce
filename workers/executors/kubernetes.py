"""Run jobs as Kubernetes Jobs: one Indexed Job per attempt, one pod per gang member.

The shape follows Airflow's cncf.kubernetes `pod_manager` / `kubernetes_helper_functions`:
- the API client is injected (`app.kube.build_api_client` makes one; nothing is built at import);
- the manifest is a pure function of the job spec (`build_job_manifest`), named after job id + attempt so
  that a redelivered launch meets its own Job (409 AlreadyExists -> adopt it);
- API calls retry only transient errors (429, 5xx, broken connections), honouring Retry-After; the rest fail fast;
- state comes from two watches (the Job, its pods), each resumed from the last resourceVersion it saw and
  relisted when that version has expired (410);
- what pods and the Job say becomes an Outcome through tables (POD_VERDICTS, JOB_VERDICTS), and
  `pod_failure_details` (pure) goes into Outcome.details;
- every member's log is followed into the sink as produced, resuming after the last timestamp delivered,
  so logs outlive the pods.

Retries are the service's, so Jobs run with backoffLimit 0: one member failing fails the whole gang.

The Python client has no client-side rate limiter (client-go defaults to 5 requests/s, burst 10). This
executor keeps its request rate low by watching rather than polling; beyond that the API server's
priority-and-fairness applies. Each execution holds 2 + members long-lived connections (two watches and
one log stream per member), hence the larger connection pool in `app.kube.build_api_client`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import urllib3
from kubernetes import client, watch
from kubernetes.client import ApiClient, ApiException

from workers.executors.base import EndKind, JobSpec, LogLine, LogSink, Outcome

log = logging.getLogger(__name__)

T = TypeVar("T")

MANAGER = "jobservice"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB_ID = "jobservice.io/job-id"
LABEL_ATTEMPT = "jobservice.io/attempt"
ANNOTATION_JOB_ID = "jobservice.io/job-id"  # the exact id; the label holds a label-safe form of it
ANNOTATION_ATTEMPT = "jobservice.io/attempt"
ANNOTATION_CLUSTER = "jobservice.io/cluster"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
CONTAINER = "main"
# A Job's pods get the hostname "<job name>-<index>", which must stay a 63-character DNS label.
MAX_JOB_NAME = 52
REQUEST_TIMEOUT = (10.0, 30.0)  # (connect, read) for ordinary calls


# ---------------------------------------------------------------------------------------------------------
# Names and the manifest


def _dns_label(text: str, limit: int) -> str:
    """`text` if it already is a DNS-1123 label within `limit`, else a cleaned, shortened form with a hash of
    the original, so that two different inputs never share a name."""
    clean = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", text.lower())).strip("-")
    if clean == text and 0 < len(clean) <= limit:
        return clean
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{clean[: limit - 9].strip('-')}-{digest}".strip("-")


def job_name(job_id: str, attempt: int) -> str:
    return _dns_label(f"{job_id}-a{attempt}", MAX_JOB_NAME)


def label_value(value: str) -> str:
    if re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", value) and len(value) <= 63:
        return value
    return _dns_label(value, 63)


def owner_selector(job_id: str, attempt: int | None = None) -> str:
    terms = [f"{LABEL_MANAGED_BY}={MANAGER}", f"{LABEL_JOB_ID}={label_value(job_id)}"]
    if attempt is not None:
        terms.append(f"{LABEL_ATTEMPT}={attempt}")
    return ",".join(terms)


def build_job_manifest(
    spec: JobSpec,
    namespace: str,
    gpu_resource: str = "nvidia.com/gpu",
    *,
    cluster: str | None = None,
    ttl_seconds_after_finished: int | None = 3600,
    node_name: str | list[str] | None = None,
    service_account_name: str | None = None,
) -> client.V1Job:
    """The batch/v1 Job for one attempt of `spec`: Indexed, one completion per gang member, no retries.

    Quantities are strings (the client validates them as such). JOB_RANK comes from the pod's completion index
    through the downward API, so every member sees its own rank from one shared template.
    """
    if not spec.image:
        raise ValueError("the job has no image: the Kubernetes executor runs containers")
    if spec.members < 1:
        raise ValueError(f"a job needs at least one member, got {spec.members}")
    name = job_name(spec.job_id, spec.attempt)
    labels = {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_JOB_ID: label_value(spec.job_id),
        LABEL_ATTEMPT: str(spec.attempt),
    }
    annotations = {ANNOTATION_JOB_ID: spec.job_id, ANNOTATION_ATTEMPT: str(spec.attempt)}
    if cluster:
        annotations[ANNOTATION_CLUSTER] = cluster

    amounts: dict[str, str] = {}
    if spec.cpu_millis > 0:
        amounts["cpu"] = f"{spec.cpu_millis}m"
    if spec.memory_bytes > 0:
        amounts["memory"] = str(spec.memory_bytes)
    if spec.gpus > 0:
        amounts[gpu_resource] = str(spec.gpus)  # extended resources must have requests == limits

    # The service's variables win over the job's own; the rank is per pod, from the completion index.
    variables = {**spec.env, **spec.base_environment(rank=0)}
    env = [
        client.V1EnvVar(
            name="JOB_RANK",
            value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(field_path=f"metadata.annotations['{COMPLETION_INDEX}']")
            ),
        )
        if key == "JOB_RANK"
        else client.V1EnvVar(name=key, value=str(value))
        for key, value in variables.items()
    ]
    container = client.V1Container(
        name=CONTAINER,
        image=spec.image,
        command=list(spec.command) if spec.command else None,
        env=env,
        resources=client.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts)) if amounts else None,
    )
    affinity = None
    if node_name:
        # matchFields on metadata.name pins to the node(s) the service's scheduler chose, whatever their labels:
        # a gang spread over nodes of the GPU type it asked for must not land on others.
        names = [node_name] if isinstance(node_name, str) else list(node_name)
        affinity = client.V1Affinity(
            node_affinity=client.V1NodeAffinity(
                required_during_scheduling_ignored_during_execution=client.V1NodeSelector(
                    node_selector_terms=[
                        client.V1NodeSelectorTerm(
                            match_fields=[
                                client.V1NodeSelectorRequirement(key="metadata.name", operator="In", values=names)
                            ]
                        )
                    ]
                )
            )
        )
    pod_spec = client.V1PodSpec(
        containers=[container],
        restart_policy="Never",
        # Service links put an env var per Service of the namespace into every container: noise, and slow at scale.
        enable_service_links=False,
        affinity=affinity,
        service_account_name=service_account_name,
    )
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations),
        spec=client.V1JobSpec(
            completion_mode="Indexed",
            completions=spec.members,
            parallelism=spec.members,
            backoff_limit=0,  # the service retries, with its own policy
            # No podFailurePolicy: with backoffLimit 0 any failed member already fails the Job, and an
            # eviction is better retried by the service (as LOST) than ignored and replaced by the Job.
            active_deadline_seconds=spec.timeout_seconds if spec.timeout_seconds else None,
            ttl_seconds_after_finished=ttl_seconds_after_finished,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=dict(labels), annotations=dict(annotations)),
                spec=pod_spec,
            ),
        ),
    )


# ---------------------------------------------------------------------------------------------------------
# From pods and Jobs to outcomes


def member_index(pod: client.V1Pod) -> int:
    meta = pod.metadata
    raw = (meta.annotations or {}).get(COMPLETION_INDEX) or (meta.labels or {}).get(COMPLETION_INDEX)
    return int(raw) if raw is not None and raw.isdigit() else 0


def _container_statuses(pod: client.V1Pod) -> list[client.V1ContainerStatus]:
    status = pod.status
    if status is None:
        return []
    return list(status.init_container_statuses or []) + list(status.container_statuses or [])


def pod_failure_details(pod: client.V1Pod) -> dict[str, Any]:
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


def pod_facts(pod: client.V1Pod) -> Iterator[tuple[str, str]]:
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


def pod_verdict(pod: client.V1Pod) -> tuple[str, Verdict] | None:
    """The first fact of the pod that the table knows, with where it was found."""
    for source, reason in pod_facts(pod):
        verdict = _lookup(POD_VERDICTS, source, reason)
        if verdict is not None:
            return source, verdict
    return None


def job_verdict(job: client.V1Job) -> tuple[Verdict, client.V1JobCondition] | None:
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


# ---------------------------------------------------------------------------------------------------------
# Calls: retry what is transient, fail fast on the rest

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ApiException):
        return error.status in TRANSIENT_STATUSES
    return isinstance(error, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def retry_after_seconds(error: BaseException) -> float | None:
    headers = getattr(error, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP-date: rare from the API server; the backoff applies


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, error: BaseException) -> float:
        asked = retry_after_seconds(error)
        if asked is not None:
            return min(asked, self.max_delay)
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return backoff * (0.5 + random.random() / 2)  # jitter, so many workers do not retry in step

    def call(self, what: str, action: Callable[[], T]) -> T:
        for attempt in itertools.count(1):
            try:
                return action()
            except Exception as error:
                if attempt >= self.attempts or not is_transient(error):
                    raise
                wait = self.delay(attempt, error)
                log.warning("%s failed (%s); retry %d of %d in %.1fs", what, _describe(error), attempt,
                            self.attempts - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


def _describe(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)


# ---------------------------------------------------------------------------------------------------------
# Watching: list, then watch from the list's version; resume; relist on 410


class _Reflector:
    """Keeps a watch open over one selection and hands every change to `on_event`.

    A watch ends (server timeout, load balancer, API server restart): it is resumed from the last
    resourceVersion seen. If that version is too old (410 Gone / Expired), the selection is listed again
    (`on_sync` gets the full current state) and watched from the list's resourceVersion.
    """

    def __init__(
        self,
        name: str,
        list_call: Callable[..., Any],
        namespace: str,
        selectors: dict[str, str],
        on_sync: Callable[[list[Any]], None],
        on_event: Callable[[str, Any], None],
        timeout_seconds: int,
    ) -> None:
        self._list_call = list_call
        self._namespace = namespace
        self._selectors = selectors
        self._on_sync = on_sync
        self._on_event = on_event
        self._timeout = timeout_seconds
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self.lists = 0
        self.resumes = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        current = self._watch
        if current is not None:
            current.stop()

    def _run(self) -> None:
        version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = self._list_call(self._namespace, **self._selectors, _request_timeout=REQUEST_TIMEOUT)
                    version = listed.metadata.resource_version
                    self.lists += 1
                    self._on_sync(list(listed.items or []))
                else:
                    self.resumes += 1
                self._watch = watch.Watch()
                # timeout_seconds also makes Watch.stream raise on 410 instead of retrying with the same version.
                for event in self._watch.stream(
                    self._list_call,
                    self._namespace,
                    **self._selectors,
                    resource_version=version,
                    timeout_seconds=self._timeout,
                    allow_watch_bookmarks=True,
                    _request_timeout=(REQUEST_TIMEOUT[0], self._timeout + 30),
                ):
                    if self._stop.is_set():
                        break
                    if event["type"] == "BOOKMARK":
                        version = event["raw_object"]["metadata"]["resourceVersion"]
                        continue
                    version = event["object"].metadata.resource_version
                    self._on_event(event["type"], event["object"])
                failures = 0
            except ApiException as error:
                if error.status == 410:
                    log.info("watch %s: resourceVersion %s expired; relisting", self._thread.name, version)
                    version = None
                    continue
                failures += 1
                log.warning("watch %s failed: %s", self._thread.name, _describe(error))
            except Exception as error:  # connection trouble, or our own stop() cutting the socket
                if self._stop.is_set():
                    return
                failures += 1
                log.warning("watch %s broke: %s", self._thread.name, _describe(error))
            finally:
                self._watch = None
            if failures:
                self._stop.wait(min(30.0, 0.2 * 2 ** min(failures, 8)))


# ---------------------------------------------------------------------------------------------------------
# Logs: follow each member's container, resume after the last line delivered

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_log_timestamp(stamp: str) -> tuple[int, datetime] | None:
    """An RFC3339Nano stamp as (nanoseconds since the epoch, for ordering; a datetime, microsecond precision)."""
    match = _STAMP.match(stamp)
    if not match:
        return None
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    base = datetime.fromisoformat(match.group(1) + zone)
    nanos = int((match.group(2) or "0").ljust(9, "0"))
    return int(base.timestamp()) * 1_000_000_000 + nanos, (base + timedelta(microseconds=nanos // 1000)).astimezone(UTC)


def _since_time(key: int) -> str:
    # The API server passes sinceTime on to the kubelet at second precision: ask from the start of that
    # second and drop what was already delivered.
    return datetime.fromtimestamp(key // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _LogFollower:
    """Streams one pod's container log (follow, timestamps) into `emit`, reconnecting without losing or
    repeating lines: after a break it asks for the log since the last timestamp's second and skips the
    lines it already delivered (older stamps, and as many equal stamps as it has seen)."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        pod: str,
        member: int,
        emit: Callable[[list[LogLine]], None],
        finished: Callable[[], bool],
        since: datetime | None = None,
        idle_timeout: float = 60.0,
    ) -> None:
        self._api = api_client
        self._namespace = namespace
        self._pod = pod
        self._member = member
        self._emit = emit
        self._finished = finished
        self._idle_timeout = idle_timeout
        self._stop = threading.Event()
        self._response: Any = None
        self._last_key: int | None = None
        self._seen_at_last = 0
        self._skip = 0
        if since is not None:
            # Lines up to `since` are already stored (microsecond precision there: cover the rest of it).
            stamp = int(since.timestamp()) * 1_000_000_000 + since.microsecond * 1000 + 999
            self._last_key, self._seen_at_last = stamp, 0
        self.connects = 0
        self._thread = threading.Thread(target=self._run, name=f"logs-{pod}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # unblocks a read waiting on a quiet stream
            except Exception:  # noqa: BLE001 - best effort; the read timeout ends it anyway
                pass

    def _open(self) -> Any:
        # The generated read_namespaced_pod_log has no since_time (the OpenAPI spec omits it, though the API
        # accepts it as PodLogOptions.sinceTime), so the request is built with the client's own serializer.
        query: list[tuple[str, Any]] = [("container", CONTAINER), ("follow", True), ("timestamps", True)]
        if self._last_key is not None:
            query.append(("sinceTime", _since_time(self._last_key)))
        method, url, headers, _, _ = self._api.param_serialize(
            method="GET",
            resource_path="/api/v1/namespaces/{namespace}/pods/{name}/log",
            path_params={"namespace": self._namespace, "name": self._pod},
            query_params=query,
            header_params={"Accept": "text/plain"},
            auth_settings=["BearerToken"],
        )
        answer = self._api.call_api(method, url, header_params=headers,
                                    _request_timeout=(REQUEST_TIMEOUT[0], self._idle_timeout))
        if not 200 <= answer.status <= 299:
            answer.read()
            raise ApiException.from_response(http_resp=answer, body=None, data=None)
        self.connects += 1
        return answer.response

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            done_before = self._finished()  # a read that starts after the container ended gets all of it
            try:
                self._response = self._open()
                self._skip = self._seen_at_last
                try:
                    self._consume(self._response, complete=done_before)
                finally:
                    self._response.release_conn()
                    self._response = None
                failures = 0
            except ApiException as error:
                if error.status == 404:
                    return  # the pod is gone, and its log with it
                if error.status != 400 and not is_transient(error):
                    log.warning("logs of pod %s: %s", self._pod, _describe(error))
                    return
                failures += 1  # 400: the container is not running yet
            except Exception as error:
                if self._stop.is_set():
                    return
                failures += 1
                log.info("logs of pod %s broke (%s); reconnecting", self._pod, _describe(error))
            if done_before or self._stop.is_set():
                return
            self._stop.wait(min(5.0, 0.05 * 2 ** min(failures, 7)))

    def _consume(self, response: Any, complete: bool) -> None:
        pending = b""
        for chunk in response.stream(2**16, decode_content=True):
            if self._stop.is_set():
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            self._deliver(lines)
        if pending and complete:  # a last line without a newline; on a broken stream it comes again whole
            self._deliver([pending])

    def _deliver(self, raw_lines: Iterable[bytes]) -> None:
        batch: list[LogLine] = []
        for raw in raw_lines:
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            stamp, _, line = text.partition(" ")
            parsed = parse_log_timestamp(stamp)
            if parsed is None:  # not stamped: keep it, stamped now
                batch.append(LogLine(at=datetime.now(UTC), stream="stdout", line=text, member=self._member))
                continue
            key, at = parsed
            if self._last_key is not None and key < self._last_key:
                continue
            if key == self._last_key:
                if self._skip > 0:
                    self._skip -= 1
                    continue
                self._seen_at_last += 1
            else:
                self._last_key, self._seen_at_last, self._skip = key, 1, 0
            # The kubelet merges stdout and stderr into one stream; which one a line came from is lost.
            batch.append(LogLine(at=at, stream="stdout", line=line, member=self._member))
        if batch:
            self._emit(batch)


# ---------------------------------------------------------------------------------------------------------
# One launched Job


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
    pod: client.V1Pod
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
        self._job: client.V1Job | None = None
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
        selector = owner_selector(spec.job_id, spec.attempt)
        self._reflectors = [
            _Reflector(f"job-{name}", self._batch.list_namespaced_job, namespace,
                       {"field_selector": f"metadata.name={name}"}, self._sync_job, self._job_event,
                       timings.watch_timeout_seconds),
            _Reflector(f"pods-{name}", self._core.list_namespaced_pod, namespace,
                       {"label_selector": selector}, self._sync_pods, self._pod_event,
                       timings.watch_timeout_seconds),
        ]
        for reflector in self._reflectors:
            reflector.start()

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
        for reflector in self._reflectors:
            reflector.stop()
        for follower in followers:
            follower.stop()

    def watch_stats(self) -> dict[str, int]:
        return {"lists": sum(r.lists for r in self._reflectors), "resumes": sum(r.resumes for r in self._reflectors)}

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
            listed = self._retry.call(f"list pods of {self.name}", lambda: self._core.list_namespaced_pod(
                self.namespace, label_selector=owner_selector(self.spec.job_id, self.spec.attempt),
                _request_timeout=REQUEST_TIMEOUT))
        except Exception as error:
            with self._lock:
                self._confirm_failures += 1
                # Judge from what the watch has seen rather than wait on an API that does not answer.
                self._pods_confirmed = self._confirm_failures >= 3
            log.warning("could not list pods of Job %s: %s", self.name, _describe(error))
            return
        self._sync_pods(list(listed.items or []))
        with self._lock:
            self._pods_confirmed = True

    def _culprit(self) -> tuple[int, Verdict, dict[str, Any]] | None:
        """The member that failed first: the one that failed the gang, not those killed after it."""
        failures = [m.failure for m in self._members.values() if m.failure is not None]
        return min(failures, key=lambda f: f[0]) if failures else None

    def _job_details(self) -> dict[str, Any]:
        return {"job_name": self.name, "namespace": self.namespace, "members": self.spec.members}

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

    def _sync_job(self, items: list[client.V1Job]) -> None:
        with self._lock:
            current = next((j for j in items if j.metadata.name == self.name), None)
            if current is None:
                self._job_gone = True
            else:
                self._job = current

    def _job_event(self, kind: str, job: client.V1Job) -> None:
        with self._lock:
            if kind == "DELETED":
                self._job_gone = True
            else:
                self._job = job

    def _sync_pods(self, items: list[client.V1Pod]) -> None:
        with self._lock:
            self._pods_synced = True
            listed = {p.metadata.name for p in items}
            for name, member in self._members.items():
                if name not in listed:
                    member.deleted = True
            for pod in items:
                self._observe(pod, deleted=False)

    def _pod_event(self, kind: str, pod: client.V1Pod) -> None:
        with self._lock:
            self._observe(pod, deleted=kind == "DELETED")

    def _observe(self, pod: client.V1Pod, deleted: bool) -> None:
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


def _scheduling_message(pod: client.V1Pod) -> str:
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


# ---------------------------------------------------------------------------------------------------------
# The executor


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
        self._batch = client.BatchV1Api(api_client)

    def manifest(self, spec: JobSpec) -> client.V1Job:
        return build_job_manifest(
            spec, self.namespace, self.gpu_resource, cluster=self.cluster,
            ttl_seconds_after_finished=self.ttl_seconds_after_finished,
            node_name=(spec.node or spec.nodes or None) if self.pin_to_node else None,
            service_account_name=self.service_account_name,
        )

    def launch(self, spec: JobSpec, logs: LogSink) -> KubernetesExecution | _Ended:
        try:
            manifest = self.manifest(spec)
        except ValueError as error:
            return _Ended(Outcome(EndKind.LAUNCH_FAILED, str(error)))
        name = manifest.metadata.name
        where = {"job_name": name, "namespace": self.namespace}
        try:
            self.retry.call(f"create Job {name}", lambda: self._batch.create_namespaced_job(
                self.namespace, manifest, _request_timeout=REQUEST_TIMEOUT))
        except ApiException as error:
            if error.status != 409:
                return _Ended(self._launch_error(error, where))
            # A redelivered launch: this attempt's Job exists already. Watch it rather than fail.
            try:
                adopted = self.adopt(spec, logs)
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
        return self._track(spec, logs, name, started_at=time.time())

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
        listed = self.retry.call(f"list Jobs of {spec.job_id}", lambda: self._batch.list_namespaced_job(
            self.namespace, label_selector=owner_selector(spec.job_id, spec.attempt), _request_timeout=REQUEST_TIMEOUT))
        job = next((j for j in listed.items or []
                    if (j.metadata.annotations or {}).get(ANNOTATION_JOB_ID) == spec.job_id
                    and (j.metadata.annotations or {}).get(ANNOTATION_ATTEMPT) == str(spec.attempt)), None)
        if job is None:
            return None
        created = job.metadata.creation_timestamp
        started_at = created.timestamp() if created else time.time()
        return self._track(spec, logs, job.metadata.name, started_at, logs_since)

    def list_managed_jobs(self) -> list[tuple[str, int, str]]:
        """(job id, attempt, Job name) for every Job this service manages in the namespace."""
        listed = self.retry.call("list managed Jobs", lambda: self._batch.list_namespaced_job(
            self.namespace, label_selector=f"{LABEL_MANAGED_BY}={MANAGER}", _request_timeout=REQUEST_TIMEOUT))
        found = []
        for job in listed.items or []:
            annotations = job.metadata.annotations or {}
            attempt = annotations.get(ANNOTATION_ATTEMPT, "")
            if ANNOTATION_JOB_ID in annotations and attempt.isdigit():
                found.append((annotations[ANNOTATION_JOB_ID], int(attempt), job.metadata.name))
        return found

    def remove_job(self, name: str) -> None:
        """Delete a Job (and, in the foreground, its pods) that no attempt owns any more; gone is fine."""
        try:
            self.retry.call(f"delete Job {name}", lambda: self._batch.delete_namespaced_job(
                name, self.namespace, propagation_policy="Foreground", _request_timeout=REQUEST_TIMEOUT))
        except ApiException as error:
            if error.status != 404:
                raise

    def _track(self, spec: JobSpec, logs: LogSink, name: str, started_at: float,
               logs_since: datetime | None = None) -> KubernetesExecution:
        return KubernetesExecution(self.api_client, self.namespace, name, spec, logs, started_at, self.timings,
                                   self.retry, logs_since)
