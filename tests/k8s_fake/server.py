"""A fake Kubernetes API server: the subset of the REST API the Kubernetes executor and inventory use.

The real `kubernetes` client deserializes strictly (pydantic models), so the shapes here follow the API
server's: camelCase fields, list objects whose items carry no kind/apiVersion, Status objects for errors
(201 on create, 404 NotFound, 409 AlreadyExists, 422 Invalid, 429 with Retry-After), one global
resourceVersion bumped by every write, and watches as chunked newline-delimited JSON events that end on
`timeoutSeconds`, that resume from a resourceVersion, and that answer an ERROR event with a 410 Expired
Status once the history they would need has been compacted.

Behind the API sit three small controllers, all driven by one timer thread:
- a Job controller for batch/v1 Jobs (Indexed or not): one pod per completion index with the labels and
  annotation the real controller sets, backoffLimit, activeDeadlineSeconds, FailureTarget before Failed,
  Complete, and foreground / background / orphan deletion;
- a scheduler that binds pods to nodes with enough free GPUs/CPU/memory, or leaves them Pending with an
  Unschedulable PodScheduled condition;
- a kubelet that runs each pod's first container by a SCRIPT chosen by image name (succeed, fail-N, oom,
  bad-image, sleep, evicted, ...) and serves its logs with RFC3339Nano timestamps.

Content negotiation is the real server's (k8s.io/apiserver endpoints/handlers/negotiation): `Accept` must
name a media type the server serializes (`application/json`, `application/yaml`,
`application/vnd.kubernetes.protobuf`, or `*/*` / `application/*`), with only the parameters it knows
(`stream=watch`, `pretty`; others ignored), else 406 NotAcceptable; `pods/log` negotiates the same way although
its body is plain text. A request body must be `application/json` or carry no Content-Type (yaml/protobuf too on the real
server), else 415. This fake writes JSON only, so it also answers 406 where yaml or protobuf alone is asked for.

Services (headless ones too) are kept and garbage-collected with the Job that owns them; nodes may carry
taints, which the scheduler honours against the pods' tolerations.

Left out on purpose: authentication, PATCH/PUT, protobuf, paging, bookmarks, most admission checks.
Test controls: `set_nodes`, `scripts`, `break_watches`, `break_log_streams`, `compact`, `inject_error`,
and the `requests` / `deletions` logs; `objects` and `get` read the state.
"""
from __future__ import annotations

import bisect
import copy
import heapq
import itertools
import json
import random
import re
import string
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]

STEP = 0.02  # seconds between lifecycle phases: short, so tests are fast
GPU = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
TERMINAL_PHASES = ("Succeeded", "Failed")


# ---------------------------------------------------------------------------------------------------------
# Test-facing configuration


@dataclass
class FakeNode:
    name: str
    gpus: int = 4
    gpu_product: str = "NVIDIA-A100-SXM4-80GB"
    cpu_millis: int = 32_000
    memory_bytes: int = 256 * 2**30
    ready: bool = True
    unschedulable: bool = False
    # Like a real kubelet, some capacity is kept back for the system: allocatable = capacity - reserved.
    reserved_cpu_millis: int = 500
    reserved_memory_bytes: int = 2**30
    taints: tuple[tuple[str, str, str], ...] = ()  # (key, value, effect), e.g. ("nvidia.com/gpu", "present", "NoSchedule")


@dataclass
class Script:
    """What a pod's container does, chosen by its image. Lines may use $VARS from the container's env."""

    lines: list[str] = field(default_factory=lambda: ["starting rank $JOB_RANK of $JOB_WORLD_SIZE", "working", "done"])
    exit_code: int | None = 0  # None: runs until deleted, printing a tick every `tick_interval`
    reason: str | None = None  # the container's termination reason; by default Completed or Error
    waiting: tuple[str, ...] = ()  # never starts: cycles through these waiting reasons (image pull errors)
    waiting_message: str = ""
    pod_reason: str | None = None  # after its lines the kubelet fails the whole pod with this reason (Evicted)
    pod_message: str = ""
    line_interval: float = 0.01
    tick_interval: float = 0.05
    by_index: dict[int, Script] = field(default_factory=dict)  # another script for some completion indexes


def default_script(image: str) -> Script:
    fail = re.fullmatch(r"test/fail-(\d+)", image)
    if fail:
        return Script(lines=["working", "error: something broke"], exit_code=int(fail.group(1)))
    scripts = {
        "test/succeed": Script(),
        "test/oom": Script(lines=["allocating"], exit_code=137, reason="OOMKilled"),
        "test/sleep": Script(lines=["sleeping"], exit_code=None),
        "test/evicted": Script(
            lines=["working"],
            exit_code=None,
            pod_reason="Evicted",
            pod_message="The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. ",
        ),
        "test/config-error": Script(waiting=("CreateContainerConfigError",),
                                    waiting_message='secret "missing" not found'),
    }
    if image in scripts:
        return scripts[image]
    # Anything else cannot be pulled, as on a real cluster with an image that does not exist.
    return Script(
        waiting=("ErrImagePull", "ImagePullBackOff"),
        waiting_message=f'failed to pull and unpack image "{image}": not found',
    )


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    status: int | None = None
    watch_error: int | None = None  # the code of an ERROR event sent on a watch (410 after compaction)
    refused_accept: str | None = None  # the Accept header of a request answered 406


@dataclass
class _Injected:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    retry_after: int | None


# ---------------------------------------------------------------------------------------------------------
# Small helpers: time, quantities, selectors, Status objects


def rfc3339(at: float | None = None) -> str:
    """metav1.Time: second precision."""
    return datetime.fromtimestamp(time.time() if at is None else at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339nano(ns: int) -> str:
    """Go's RFC3339Nano, as the kubelet stamps log lines: trailing zeros of the fraction dropped."""
    seconds, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{frac:09d}".rstrip("0")
    return f"{base}.{fraction}Z" if fraction else f"{base}Z"


def parse_rfc3339_ns(value: str) -> int:
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", value)
    if not match:
        raise ValueError(f"invalid RFC3339 time {value!r}")
    base = datetime.fromisoformat(match.group(1) + (match.group(3).replace("Z", "+00:00")))
    return int(base.timestamp()) * 1_000_000_000 + int((match.group(2) or "0").ljust(9, "0"))


_SUFFIXES = {"m": 0.001, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


def parse_quantity(value: Any) -> float:
    match = _QUANTITY.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"quantities must match the regular expression {_QUANTITY.pattern!r}")
    return float(match.group(1)) * _SUFFIXES[match.group(2) or ""]


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_KEY_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not all(_DNS_LABEL.match(p) for p in prefix.split("."))):
        return False
    return len(name) <= 63 and bool(_LABEL_KEY_NAME.match(name))


def valid_label_value(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 63 and bool(_LABEL_VALUE.match(value))


class SelectorError(ValueError):
    pass


def _split_outside_parens(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_matcher(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """The label selector grammar: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_outside_parens(selector or ""):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            tests.append(lambda labels, k=key, vs=values, neg=(op == "notin"): (labels.get(k) in vs) != neg)
        elif m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", term):
            key, op, value = m.groups()
            tests.append(lambda labels, k=key, v=value, neg=(op == "!="): (labels.get(k) == v) != neg)
        elif m := re.fullmatch(r"!\s*(\S+)", term):
            tests.append(lambda labels, k=m.group(1): k not in labels)
        elif re.fullmatch(r"[^!=\s(),]+", term):
            tests.append(lambda labels, k=term: k in labels)
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
    return lambda labels: all(test(labels) for test in tests)


FIELD_PATHS: dict[str, dict[str, Callable[[Obj], str]]] = {
    "pods": {
        "metadata.name": lambda o: o["metadata"]["name"],
        "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
        "spec.nodeName": lambda o: o["spec"].get("nodeName", ""),
        "status.phase": lambda o: o["status"].get("phase", ""),
    },
    "jobs": {
        "metadata.name": lambda o: o["metadata"]["name"],
        "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
    },
    "services": {
        "metadata.name": lambda o: o["metadata"]["name"],
        "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
    },
    "nodes": {
        "metadata.name": lambda o: o["metadata"]["name"],
        "spec.unschedulable": lambda o: str(bool(o["spec"].get("unschedulable", False))).lower(),
    },
}


def field_matcher(resource: str, selector: str | None) -> Callable[[Obj], bool]:
    tests: list[Callable[[Obj], bool]] = []
    for term in _split_outside_parens(selector or ""):
        m = re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*(\S*)", term)
        if not m:
            raise SelectorError(f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        getter = FIELD_PATHS[resource].get(path)
        if getter is None:
            raise SelectorError(f'field label not supported: {path}')
        tests.append(lambda obj, g=getter, v=value, neg=(op == "!="): (g(obj) == v) != neg)
    return lambda obj: all(test(obj) for test in tests)


# What the real API server can serialize for the built-in resources, and the media-type parameters it accepts.
REAL_MEDIA_TYPES = ("application/json", "application/yaml", "application/vnd.kubernetes.protobuf")
SERVED_MEDIA_TYPE = "application/json"  # what this fake writes


def negotiate(accept: str | None) -> str | None:
    """The media type an `Accept` header gets from the real API server, or None where it answers 406.

    No header (or an empty one) means JSON. Clauses are taken by quality (q=0 refuses); unknown parameters
    (`charset`) are ignored as the real server ignores them, `stream` must be `watch`, and a conversion
    (`as`/`g`/`v`: Table, PartialObjectMetadata) is not served by this fake: that clause is skipped.
    """
    if accept is None or not accept.strip():
        return SERVED_MEDIA_TYPE
    clauses: list[tuple[float, int, str, dict[str, str]]] = []
    for order, raw in enumerate(accept.split(",")):
        kind, *raw_params = [part.strip() for part in raw.split(";")]
        params: dict[str, str] = {}
        quality = 1.0
        for param in raw_params:
            key, _, value = param.partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
            elif key:
                params[key] = value
        clauses.append((-quality, order, kind.lower(), params))
    for negative_quality, _, kind, params in sorted(clauses):
        if negative_quality >= 0:
            continue
        if params.get("stream", "watch") != "watch" or any(key in params for key in ("as", "g", "v")):
            continue
        chosen = REAL_MEDIA_TYPES[0] if kind in ("*/*", "application/*") else kind
        if chosen in REAL_MEDIA_TYPES:
            # The real server would answer; this fake can only when the choice is JSON.
            return chosen if chosen == SERVED_MEDIA_TYPE else None
    return None


def status_object(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                 "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.status = status_object(code, reason, message, details)


RESOURCES: dict[str, dict[str, str]] = {
    "pods": {"kind": "Pod", "apiVersion": "v1", "group": ""},
    "jobs": {"kind": "Job", "apiVersion": "batch/v1", "group": "batch"},
    "nodes": {"kind": "Node", "apiVersion": "v1", "group": ""},
    "services": {"kind": "Service", "apiVersion": "v1", "group": ""},
}


def _qualified(resource: str) -> str:
    group = RESOURCES[resource]["group"]
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, name: str) -> ApiError:
    group = RESOURCES[resource]["group"]
    details = {"name": name, "kind": resource} | ({"group": group} if group else {})
    return ApiError(404, "NotFound", f'{_qualified(resource)} "{name}" not found', details)


_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what the API server's generateName draws from


def random_suffix(n: int = 5) -> str:
    return "".join(random.choice(_SUFFIX_CHARS) for _ in range(n))


# ---------------------------------------------------------------------------------------------------------
# The fake cluster


class FakeKubernetes:
    """State, controllers and HTTP server. Use as a context manager or call start()/stop()."""

    def __init__(self, nodes: Iterable[FakeNode] | None = None, step: float = STEP) -> None:
        self.step = step
        self.scripts: dict[str, Script] = {}
        self.requests: list[Request] = []
        self.deletions: list[tuple[str, str, str, str | None]] = []  # (resource, namespace, name, propagation)
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        # A followed pod log waits on a condition of its own (same lock): a write wakes that pod's followers,
        # not every open stream (1,000 followers each woken by every write made the fake the bottleneck).
        self._log_waiters: dict[str, tuple[threading.Condition, int]] = {}  # pod uid -> (condition, streams)
        # Indexes over pods, kept by _write (the one place the store changes), so that the controllers' usual
        # questions (a pod by uid, a Job's pods, what runs on a node, what is unbound) do not scan every pod.
        # key -> (uid, owners, node, what it requests there while it has not ended)
        self._pod_index: dict[tuple[str, str], tuple[str, tuple[str, ...], str | None, dict[str, float]]] = {}
        self._pods_by_uid: dict[str, tuple[str, str]] = {}
        self._pods_by_owner: dict[str, set[tuple[str, str]]] = {}
        self._pods_by_node: dict[str, set[tuple[str, str]]] = {}
        self._unbound_pods: set[tuple[str, str]] = set()
        # What the live pods bound to each node request, kept with the pod index as the kube-scheduler's cache
        # keeps it: a scheduling pass reads a node's free room without summing its pods (at 1,000 running pods
        # that sum, per node per pending pod, was most of the fake's time and held its lock).
        self._requested_on: dict[str, dict[str, float]] = {}
        self._jobs_by_uid: dict[str, tuple[str, str]] = {}
        self._rv = 1
        self._compacted_rv = 0
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {r: {} for r in RESOURCES}
        self._history: list[tuple[int, str, str, Obj]] = []  # (rv, resource, event type, object)
        self._history_rvs: list[int] = []
        self._logs: dict[str, list[tuple[int, str]]] = {}  # pod uid -> (unix ns, line)
        self._env: dict[str, dict[str, str]] = {}  # pod uid -> resolved container env
        self._watch_epoch = 0
        self._log_epoch = 0
        self._closed = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._injected: list[_Injected] = []
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self.set_nodes(nodes if nodes is not None else [
            FakeNode("gpu-node-1", gpus=4, gpu_product="NVIDIA-A100-SXM4-80GB"),
            FakeNode("gpu-node-2", gpus=4, gpu_product="NVIDIA-H100-80GB-HBM3"),
        ])

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeKubernetes:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._threads = [
            threading.Thread(target=server.serve_forever, name="fake-k8s-http", daemon=True),
            threading.Thread(target=self._run_timers, name="fake-k8s-controllers", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._wake_log_followers()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeKubernetes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls --------------------------------------------------------------------------------

    def set_nodes(self, nodes: Iterable[FakeNode]) -> None:
        with self._cond:
            wanted = {node.name: self._node_object(i, node) for i, node in enumerate(nodes, start=1)}
            for key in list(self._objects["nodes"]):
                if key[1] not in wanted:
                    self._remove("nodes", self._objects["nodes"][key])
            for name, obj in wanted.items():
                existing = self._objects["nodes"].get(("", name))
                if existing:
                    obj["metadata"]["uid"] = existing["metadata"]["uid"]
                self._write("nodes", obj, "MODIFIED" if existing else "ADDED")
            self._after(0, self._schedule)

    def break_watches(self) -> None:
        """End every open watch, as an API server restart or a load balancer would."""
        with self._cond:
            self._watch_epoch += 1
            self._cond.notify_all()

    def break_log_streams(self) -> None:
        with self._cond:
            self._log_epoch += 1
            self._cond.notify_all()
            self._wake_log_followers()

    def compact(self) -> int:
        """Forget the history so far, as etcd compaction does: resuming from an older version gets 410.

        Other writes in a real cluster keep the global resourceVersion moving; a node heartbeat stands in
        for them, so a watcher's last-seen version is older than the compaction point.
        """
        with self._cond:
            for key, node in list(self._objects["nodes"].items()):
                for condition in node["status"]["conditions"]:
                    condition["lastHeartbeatTime"] = rfc3339()
                self._write("nodes", node, "MODIFIED")
            # Open watches keep going (the API server's watch cache serves them); only new ones that ask
            # for an older version are refused. The history stays in memory: tests are short.
            self._compacted_rv = self._rv
            return self._compacted_rv

    def inject_error(self, method: str, path_regex: str, status: int, times: int = 1,
                     retry_after: int | None = None) -> None:
        """The next `times` matching requests get this error (429 / 5xx / 403 ...) instead of an answer."""
        with self._cond:
            self._injected.append(_Injected(method.upper(), re.compile(path_regex), status, times, retry_after))

    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        with self._cond:
            obj = self._objects[resource].get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def objects(self, resource: str, namespace: str | None = None, label_selector: str | None = None) -> list[Obj]:
        match = label_matcher(label_selector)
        with self._cond:
            return [copy.deepcopy(o) for (ns, _), o in self._objects[resource].items()
                    if (namespace is None or ns == namespace) and match(o["metadata"].get("labels", {}))]

    def delete_pod(self, namespace: str, name: str) -> None:
        """Someone (a drain, an admin) deletes a pod."""
        with self._cond:
            self._delete_pod(namespace, name)

    def served(self, method: str, path_regex: str) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.method == method and re.search(path_regex, r.path)]

    # -- the store: every write bumps the global resourceVersion and lands in the watch history ----------

    def _write(self, resource: str, obj: Obj, event: str) -> Obj:
        self._rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        key = (meta.get("namespace", ""), meta["name"])
        if event == "DELETED":
            self._objects[resource].pop(key, None)
        else:
            self._objects[resource][key] = obj
        if resource == "pods":
            self._index_pod(key, None if event == "DELETED" else obj)
            self._wake_log_followers(meta.get("uid"))
        elif resource == "jobs":
            if event == "DELETED":
                self._jobs_by_uid.pop(meta["uid"], None)
            else:
                self._jobs_by_uid[meta["uid"]] = key
        self._history.append((self._rv, resource, event, copy.deepcopy(obj)))
        self._history_rvs.append(self._rv)
        self._cond.notify_all()
        return obj

    def _index_pod(self, key: tuple[str, str], pod: Obj | None) -> None:
        old = self._pod_index.pop(key, None)
        if old is not None:
            uid, owners, node, requests = old
            self._pods_by_uid.pop(uid, None)
            for owner in owners:
                self._pods_by_owner.get(owner, set()).discard(key)
            if node is not None:
                self._pods_by_node.get(node, set()).discard(key)
                requested = self._requested_on.setdefault(node, {})
                for name, amount in requests.items():
                    requested[name] = requested.get(name, 0) - amount
        self._unbound_pods.discard(key)
        if pod is None:
            return
        meta = pod["metadata"]
        uid = meta["uid"]
        owners = tuple(ref["uid"] for ref in meta.get("ownerReferences") or [] if ref.get("uid"))
        node = pod["spec"].get("nodeName")
        # What the pod takes on its node while it has not ended (the kube-scheduler's NodeInfo.Requested).
        requests = self._pod_requests(pod) if node is not None and pod["status"].get("phase") not in TERMINAL_PHASES else {}
        self._pod_index[key] = (uid, owners, node, requests)
        self._pods_by_uid[uid] = key
        for owner in owners:
            self._pods_by_owner.setdefault(owner, set()).add(key)
        if node is not None:
            self._pods_by_node.setdefault(node, set()).add(key)
            requested = self._requested_on.setdefault(node, {})
            for name, amount in requests.items():
                requested[name] = requested.get(name, 0) + amount
        elif not meta.get("deletionTimestamp"):
            self._unbound_pods.add(key)

    def _wake_log_followers(self, uid: str | None = None) -> None:
        """Wake the followers of one pod's log (a line, a phase change), or of every pod's (uid None)."""
        waiters = self._log_waiters.values() if uid is None else [w for w in [self._log_waiters.get(uid)] if w]
        for waiter, _ in waiters:
            waiter.notify_all()

    def _remove(self, resource: str, obj: Obj) -> None:
        self._write(resource, obj, "DELETED")
        if resource == "jobs":
            self._collect_garbage(obj["metadata"]["uid"])

    def _collect_garbage(self, owner_uid: str) -> None:
        """The garbage collector: Services owned by a deleted Job go with it (pods have their own path)."""
        for service in list(self._objects["services"].values()):
            if any(r.get("uid") == owner_uid for r in service["metadata"].get("ownerReferences") or []):
                self._write("services", service, "DELETED")

    def _job_by_uid(self, uid: str) -> Obj | None:
        key = self._jobs_by_uid.get(uid)
        return self._objects["jobs"].get(key) if key is not None else None

    def _find(self, resource: str, namespace: str, name: str) -> Obj | None:
        return self._objects[resource].get((namespace, name))

    def _new_meta(self, meta: Obj, namespace: str | None) -> Obj:
        meta = copy.deepcopy(meta)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + random_suffix()
        if namespace is not None:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = rfc3339()
        meta.setdefault("generation", 1)
        return meta

    # -- timers: the controllers' clock ----------------------------------------------------------------

    def _after(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), action))
        self._cond.notify_all()

    def _run_timers(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._timers and self._timers[0][0] <= now:
                    _, _, action = heapq.heappop(self._timers)
                    action()
                    continue
                self._cond.wait(timeout=(self._timers[0][0] - now) if self._timers else 1.0)

    # -- nodes and the scheduler -----------------------------------------------------------------------

    def _node_object(self, index: int, node: FakeNode) -> Obj:
        labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        capacity = {"cpu": str(node.cpu_millis // 1000), "memory": f"{node.memory_bytes // 1024}Ki", "pods": "110"}
        allocatable = {
            "cpu": f"{node.cpu_millis - node.reserved_cpu_millis}m",
            "memory": f"{(node.memory_bytes - node.reserved_memory_bytes) // 1024}Ki",
            "pods": "110",
        }
        if node.gpus:
            labels |= {GPU_PRODUCT_LABEL: node.gpu_product, "nvidia.com/gpu.count": str(node.gpus)}
            capacity[GPU] = allocatable[GPU] = str(node.gpus)
        now = rfc3339()
        ready = {"type": "Ready", "status": "True" if node.ready else "False",
                 "reason": "KubeletReady" if node.ready else "KubeletNotReady",
                 "message": "kubelet is posting ready status" if node.ready else "container runtime is down",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "uid": str(uuid.uuid4()), "creationTimestamp": now, "labels": labels},
            "spec": ({"unschedulable": True} if node.unschedulable else {})
                    | ({"taints": [{"key": k, "value": v, "effect": e} for k, v, e in node.taints]} if node.taints else {}),
            "status": {
                "capacity": capacity, "allocatable": allocatable, "conditions": [ready],
                "addresses": [{"type": "InternalIP", "address": f"10.0.0.{index}"},
                              {"type": "Hostname", "address": node.name}],
            },
        }

    @staticmethod
    def _pod_requests(pod: Obj) -> dict[str, float]:
        total: dict[str, float] = {}
        for container in pod["spec"]["containers"]:
            for name, value in ((container.get("resources") or {}).get("requests") or {}).items():
                total[name] = total.get(name, 0) + parse_quantity(value)
        return total

    def _free_on(self, node: Obj) -> dict[str, float]:
        free = {name: parse_quantity(value) for name, value in node["status"]["allocatable"].items()}
        for name, amount in self._requested_on.get(node["metadata"]["name"], {}).items():
            free[name] = free.get(name, 0) - amount
        return free

    @staticmethod
    def _node_selected(pod: Obj, node: Obj) -> bool:
        labels = node["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in (pod["spec"].get("nodeSelector") or {}).items()):
            return False
        required = (((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {})
                    .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        terms = required.get("nodeSelectorTerms") or []
        if not terms:
            return True

        def term_matches(term: Obj) -> bool:
            fields = {"metadata.name": node["metadata"]["name"]}
            checks = [(fields, e) for e in term.get("matchFields") or []]
            checks += [(labels, e) for e in term.get("matchExpressions") or []]
            for source, expr in checks:
                present = source.get(expr["key"])
                ok = {"In": present in (expr.get("values") or []), "NotIn": present not in (expr.get("values") or []),
                      "Exists": present is not None, "DoesNotExist": present is None}.get(expr["operator"], False)
                if not ok:
                    return False
            return True

        return any(term_matches(t) for t in terms)

    def _unfit(self, pod: Obj, node: Obj) -> str | None:
        """Why `pod` cannot go on `node`, in the kube-scheduler's words; None if it fits."""
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"]):
            return "node(s) had untolerated taint {node.kubernetes.io/not-ready: }"
        if node["spec"].get("unschedulable"):
            return "node(s) were unschedulable"
        untolerated = next((t for t in node["spec"].get("taints") or [] if t["effect"] in ("NoSchedule", "NoExecute")
                            and not any(_tolerates(tol, t) for tol in pod["spec"].get("tolerations") or [])), None)
        if untolerated is not None:
            return f"node(s) had untolerated taint {{{untolerated['key']}: {untolerated.get('value', '')}}}"
        if not self._node_selected(pod, node):
            return "node(s) didn't match Pod's node affinity/selector"
        free = self._free_on(node)
        short = next((r for r, amount in self._pod_requests(pod).items() if amount > free.get(r, 0) + 1e-9), None)
        return f"Insufficient {short}" if short else None

    def _schedule(self) -> None:
        pending = sorted(
            (self._objects["pods"][key] for key in self._unbound_pods),
            key=lambda p: int(p["metadata"]["resourceVersion"]),
        )
        nodes = list(self._objects["nodes"].values())
        for pod in pending:
            chosen = next((node for node in nodes if self._unfit(pod, node) is None), None)
            if chosen is not None:
                self._bind(pod, chosen)
                continue
            why = Counter(self._unfit(pod, node) for node in nodes)
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(why.items()) if reason)
            message = f"0/{len(nodes)} nodes are available: {reasons}." if nodes else "no nodes available"
            conditions = pod["status"].setdefault("conditions", [])
            if not any(c["type"] == "PodScheduled" and c.get("message") == message for c in conditions):
                conditions[:] = [c for c in conditions if c["type"] != "PodScheduled"]
                conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                   "message": message, "lastProbeTime": None, "lastTransitionTime": rfc3339()})
                self._write("pods", pod, "MODIFIED")

    def _bind(self, pod: Obj, node: Obj) -> None:
        now = rfc3339()
        pod["spec"]["nodeName"] = node["metadata"]["name"]
        status = pod["status"]
        status["conditions"] = [{"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                                 "lastTransitionTime": now}]
        status["hostIP"] = node["status"]["addresses"][0]["address"]
        status["startTime"] = now
        status["containerStatuses"] = [self._container_status(c, {"waiting": {"reason": "ContainerCreating"}})
                                       for c in pod["spec"]["containers"]]
        self._write("pods", pod, "MODIFIED")
        uid = pod["metadata"]["uid"]
        self._after(self.step, lambda: self._start(uid))

    # -- the kubelet ---------------------------------------------------------------------------------------

    @staticmethod
    def _container_status(container: Obj, state: Obj, ready: bool = False) -> Obj:
        return {"name": container["name"], "image": container["image"], "imageID": "", "ready": ready,
                "restartCount": 0, "started": "running" in state, "state": state}

    def _pod_by_uid(self, uid: str) -> Obj | None:
        key = self._pods_by_uid.get(uid)
        return self._objects["pods"].get(key) if key is not None else None

    def script_for(self, image: str) -> Script:
        return self.scripts.get(image) or default_script(image)

    def _script_of(self, pod: Obj) -> Script:
        script = self.script_for(pod["spec"]["containers"][0]["image"])
        index = pod["metadata"].get("annotations", {}).get(COMPLETION_INDEX)
        return script.by_index.get(int(index), script) if index is not None else script

    def _resolve_env(self, pod: Obj, container: Obj) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = string.Template(var["value"] or "").safe_substitute(env)
            elif path := ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath"):
                env[var["name"]] = _field_ref(pod, path)
        return env

    def _start(self, uid: str) -> None:
        pod = self._pod_by_uid(uid)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        container = pod["spec"]["containers"][0]
        script = self._script_of(pod)
        if script.waiting:
            self._keep_waiting(uid, script, 0)
            return
        now = rfc3339()
        self._env[uid] = self._resolve_env(pod, container)
        self._logs.setdefault(uid, [])
        status = pod["status"]
        status["phase"] = "Running"
        status["podIP"] = f"10.244.0.{random.randint(2, 250)}"
        status["conditions"] = [{"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
                                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
        status["containerStatuses"] = [self._container_status(c, {"running": {"startedAt": now}}, ready=True)
                                       for c in pod["spec"]["containers"]]
        self._write("pods", pod, "MODIFIED")
        self._sync_owner(pod)
        self._after(script.line_interval, lambda: self._print(uid, 0))

    def _keep_waiting(self, uid: str, script: Script, turn: int) -> None:
        pod = self._pod_by_uid(uid)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        reason = script.waiting[turn % len(script.waiting)]
        pod["status"]["containerStatuses"] = [
            self._container_status(c, {"waiting": {"reason": reason, "message": script.waiting_message}})
            for c in pod["spec"]["containers"]
        ]
        self._write("pods", pod, "MODIFIED")
        if len(script.waiting) > 1:
            self._after(3 * self.step, lambda: self._keep_waiting(uid, script, turn + 1))

    def _log(self, uid: str, text: str) -> None:
        lines = self._logs.setdefault(uid, [])
        stamp = time.time_ns()
        if lines and stamp <= lines[-1][0]:
            stamp = lines[-1][0] + 1
        lines.append((stamp, string.Template(text).safe_substitute(self._env.get(uid, {}))))
        self._wake_log_followers(uid)

    def _print(self, uid: str, line: int) -> None:
        pod = self._pod_by_uid(uid)
        if pod is None or pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") != "Running":
            return
        script = self._script_of(pod)
        if line < len(script.lines):
            self._log(uid, script.lines[line])
            self._after(script.line_interval, lambda: self._print(uid, line + 1))
        elif script.pod_reason:
            self._fail_pod(pod, script)
        elif script.exit_code is None:
            self._log(uid, f"tick {line - len(script.lines)}")
            self._after(script.tick_interval, lambda: self._print(uid, line + 1))
        else:
            reason = script.reason or ("Completed" if script.exit_code == 0 else "Error")
            self._terminate(pod, script.exit_code, reason)

    def _terminate(self, pod: Obj, exit_code: int, reason: str) -> None:
        now = rfc3339()
        status = pod["status"]
        statuses = []
        for container, previous in zip(pod["spec"]["containers"], status.get("containerStatuses") or [], strict=False):
            started = (previous["state"].get("running") or {}).get("startedAt", now)
            terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now,
                          "containerID": f"containerd://{uuid.uuid4().hex}"}
            statuses.append(self._container_status(container, {"terminated": terminated}))
        status["containerStatuses"] = statuses
        status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
        for condition in status.get("conditions", []):
            if condition["type"] in ("Ready", "ContainersReady"):
                condition.update(status="False", reason="PodCompleted" if exit_code == 0 else "PodFailed",
                                 lastTransitionTime=now)
        self._write("pods", pod, "MODIFIED")
        self._sync_owner(pod)
        self._after(0, self._schedule)

    def _fail_pod(self, pod: Obj, script: Script) -> None:
        """The kubelet gives up on the whole pod (eviction): pod-level reason and a DisruptionTarget."""
        pod["status"]["reason"] = script.pod_reason
        pod["status"]["message"] = script.pod_message
        pod["status"].setdefault("conditions", []).append({
            "type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
            "message": script.pod_message, "lastProbeTime": None, "lastTransitionTime": rfc3339()})
        self._terminate(pod, 137, "Error")

    def _delete_pod(self, namespace: str, name: str) -> Obj | None:
        """Graceful deletion: deletionTimestamp now, containers killed (SIGTERM, exit 143), then gone."""
        pod = self._find("pods", namespace, name)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return pod
        pod["metadata"]["deletionTimestamp"] = rfc3339()
        pod["metadata"]["deletionGracePeriodSeconds"] = 30
        self._write("pods", pod, "MODIFIED")
        uid = pod["metadata"]["uid"]

        def killed() -> None:
            current = self._pod_by_uid(uid)
            if current is not None and current["status"].get("phase") == "Running":
                self._terminate(current, 143, "Error")
            self._after(self.step, gone)

        def gone() -> None:
            current = self._pod_by_uid(uid)
            if current is not None:
                self._remove("pods", current)
                self._logs.pop(uid, None)
                self._sync_owner(current)
                self._after(0, self._schedule)

        self._after(self.step, killed)
        return pod

    # -- the Job controller ----------------------------------------------------------------------------------

    def _owned_pods(self, job: Obj) -> list[Obj]:
        pods = self._objects["pods"]
        return sorted((pods[key] for key in self._pods_by_owner.get(job["metadata"]["uid"], ())),
                      key=lambda p: int(p["metadata"]["resourceVersion"]))

    def _sync_owner(self, pod: Obj) -> None:
        for ref in pod["metadata"].get("ownerReferences", []):
            if ref["kind"] == "Job":
                job = self._find("jobs", pod["metadata"]["namespace"], ref["name"])
                if job is not None and job["metadata"]["uid"] == ref["uid"]:
                    self._sync_job(job)

    def _create_job_pod(self, job: Obj, index: int | None) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        labels = dict(template["metadata"].get("labels", {}))
        annotations = dict(template["metadata"].get("annotations", {}))
        spec = copy.deepcopy(template["spec"])
        prefix = f"{meta['name']}-"
        if index is not None:
            labels[COMPLETION_INDEX] = annotations[COMPLETION_INDEX] = str(index)
            prefix = f"{meta['name']}-{index}-"
            spec["hostname"] = f"{meta['name']}-{index}"
            for container in spec["containers"]:
                container.setdefault("env", []).insert(0, {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                    "apiVersion": "v1", "fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}})
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
                 "controller": True, "blockOwnerDeletion": True}
        pod_meta = {"generateName": prefix, "labels": labels, "annotations": annotations, "ownerReferences": [owner]}
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": self._new_meta(pod_meta, meta["namespace"]),
            "spec": spec,
            "status": {"phase": "Pending", "qosClass": qos_class(spec)},
        }
        self._write("pods", pod, "ADDED")
        self._after(self.step, self._schedule)

    def _sync_job(self, job: Obj) -> None:
        meta, spec, status = job["metadata"], job["spec"], job["status"]
        pods = self._owned_pods(job)
        if meta.get("deletionTimestamp"):
            if not pods:  # foreground deletion: the Job goes once its pods have
                self._remove("jobs", job)
            return
        before = copy.deepcopy(status)
        indexed = spec.get("completionMode") == "Indexed"
        conditions = status.setdefault("conditions", [])
        kinds = {c["type"] for c in conditions if c["status"] == "True"}
        finished = bool(kinds & {"Complete", "Failed", "FailureTarget"})
        active, terminating = _split_live(pods)
        failed = sum(1 for p in pods if p["status"].get("phase") == "Failed")
        succeeded_pods = [p for p in pods if p["status"].get("phase") == "Succeeded"]
        done = {int(p["metadata"]["annotations"][COMPLETION_INDEX]) for p in succeeded_pods} if indexed else set()
        completions = spec.get("completions") or 1
        succeeded = len(done) if indexed else len(succeeded_pods)
        if not finished:
            if failed > spec.get("backoffLimit", 6):
                self._fail_job(job, "BackoffLimitExceeded", "Job has reached the specified backoff limit", active)
            elif succeeded >= completions:
                now = rfc3339()
                conditions.append({"type": "Complete", "status": "True", "lastProbeTime": now,
                                   "lastTransitionTime": now})
                status["completionTime"] = now
            else:  # start what is missing, up to parallelism
                busy = active + terminating
                running = {int(p["metadata"]["annotations"][COMPLETION_INDEX]) for p in busy} if indexed else set()
                missing = ([i for i in range(completions) if i not in done and i not in running] if indexed
                           else [None] * (completions - succeeded - len(busy)))
                for index in missing[: max(0, spec.get("parallelism", 1) - len(busy))]:
                    self._create_job_pod(job, index)
            active, terminating = _split_live(self._owned_pods(job))
        target = next((c for c in conditions if c["type"] == "FailureTarget"), None)
        if target and not active and not terminating and "Failed" not in kinds:
            # Since Kubernetes 1.31 the Failed condition waits until the Job's pods have terminated.
            now = rfc3339()
            conditions.append({"type": "Failed", "status": "True", "reason": target["reason"],
                               "message": target["message"], "lastProbeTime": now, "lastTransitionTime": now})
        status["active"] = len(active)
        status["ready"] = sum(1 for p in active if any(c["type"] == "Ready" and c["status"] == "True"
                                                          for c in p["status"].get("conditions", [])))
        status["terminating"] = len(terminating)
        status["succeeded"] = succeeded
        status["failed"] = failed
        if indexed:
            status["completedIndexes"] = index_intervals(done)
        if status != before:
            self._write("jobs", job, "MODIFIED")

    def _fail_job(self, job: Obj, reason: str, message: str, active: list[Obj]) -> None:
        now = rfc3339()
        job["status"]["conditions"].append({"type": "FailureTarget", "status": "True", "reason": reason,
                                            "message": message, "lastProbeTime": now, "lastTransitionTime": now})
        for pod in active:
            self._delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"])

    def _deadline(self, uid: str) -> None:
        job = self._job_by_uid(uid)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        if any(c["type"] in ("Complete", "Failed", "FailureTarget") for c in job["status"].get("conditions", [])):
            return
        active = [p for p in self._owned_pods(job) if p["status"].get("phase") not in TERMINAL_PHASES]
        self._fail_job(job, "DeadlineExceeded", "Job was active longer than specified deadline", active)
        self._sync_job(job)

    def _start_job(self, uid: str) -> None:
        job = self._job_by_uid(uid)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        job["status"]["startTime"] = rfc3339()
        if (deadline := job["spec"].get("activeDeadlineSeconds")) is not None:
            self._after(deadline, lambda: self._deadline(uid))
        self._sync_job(job)

    # -- API verbs (called by the HTTP handler, under the lock) --------------------------------------------

    def create_job(self, namespace: str, body: Obj) -> Obj:
        name = (body.get("metadata") or {}).get("name")
        if name and self._find("jobs", namespace, name):
            raise ApiError(409, "AlreadyExists", f'jobs.batch "{name}" already exists',
                           {"name": name, "group": "batch", "kind": "jobs"})
        validate_job(body)
        job = copy.deepcopy(body)
        job["apiVersion"], job["kind"] = "batch/v1", "Job"
        job["metadata"] = self._new_meta(job["metadata"], namespace)
        uid, name = job["metadata"]["uid"], job["metadata"]["name"]
        spec = job["spec"]
        # What the API server defaults and adds on create.
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        template_meta = spec["template"].setdefault("metadata", {})
        template_meta["labels"] = {**template_meta.get("labels", {}), "batch.kubernetes.io/controller-uid": uid,
                                   "batch.kubernetes.io/job-name": name, "controller-uid": uid, "job-name": name}
        pod_spec = spec["template"]["spec"]
        default_requests(pod_spec)
        pod_spec.setdefault("terminationGracePeriodSeconds", 30)
        pod_spec.setdefault("dnsPolicy", "ClusterFirst")
        pod_spec.setdefault("schedulerName", "default-scheduler")
        for container in pod_spec["containers"]:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("imagePullPolicy", "Always" if ":" not in container["image"].rsplit("/", 1)[-1]
                                 or container["image"].endswith(":latest") else "IfNotPresent")
        job["status"] = {}
        self._write("jobs", job, "ADDED")
        self._after(self.step, lambda: self._start_job(uid))
        return job

    def create_pod(self, namespace: str, body: Obj) -> Obj:
        name = (body.get("metadata") or {}).get("name")
        if name and self._find("pods", namespace, name):
            raise ApiError(409, "AlreadyExists", f'pods "{name}" already exists', {"name": name, "kind": "pods"})
        errors = validate_pod_spec(body.get("spec") or {}, "spec", pod_only=True)
        if errors or not (name or (body.get("metadata") or {}).get("generateName")):
            errors = errors or [("metadata.name", "Required value: name or generateName is required")]
            raise invalid("Pod", name or "", errors)
        pod = copy.deepcopy(body)
        pod["apiVersion"], pod["kind"] = "v1", "Pod"
        pod["metadata"] = self._new_meta(pod["metadata"], namespace)
        default_requests(pod["spec"])
        pod["status"] = {"phase": "Pending", "qosClass": qos_class(pod["spec"])}
        self._write("pods", pod, "ADDED")
        self._after(self.step, self._schedule)
        return pod

    def create_service(self, namespace: str, body: Obj) -> Obj:
        meta = body.get("metadata") or {}
        name = meta.get("name") or ""
        if self._find("services", namespace, name):
            raise ApiError(409, "AlreadyExists", f'services "{name}" already exists', {"name": name, "kind": "services"})
        errors = validate_service(body)
        if errors:
            raise invalid("Service", name, errors)
        service = copy.deepcopy(body)
        service["apiVersion"], service["kind"] = "v1", "Service"
        service["metadata"] = self._new_meta(service["metadata"], namespace)
        spec = service.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec["clusterIPs"] = [spec.get("clusterIP") or "10.96.0.10"]
        spec.setdefault("clusterIP", spec["clusterIPs"][0])
        service["status"] = {"loadBalancer": {}}
        owners = [r for r in service["metadata"].get("ownerReferences") or []]
        self._write("services", service, "ADDED")
        # An owner that is already gone: the garbage collector removes the dependent at once.
        if owners and not any(r.get("uid") in self._jobs_by_uid for r in owners):
            self._write("services", service, "DELETED")
        return service

    def delete_job(self, namespace: str, name: str, policy: str | None) -> tuple[int, Obj]:
        job = self._find("jobs", namespace, name)
        if job is None:
            raise not_found("jobs", name)
        self.deletions.append(("jobs", namespace, name, policy))
        # batch/v1 Jobs orphan their pods unless told otherwise (kubectl asks for Background).
        policy = policy or "Orphan"
        pods = self._owned_pods(job)
        if policy == "Foreground":
            if not job["metadata"].get("deletionTimestamp"):
                job["metadata"]["deletionTimestamp"] = rfc3339()
                job["metadata"]["deletionGracePeriodSeconds"] = 0
                job["metadata"]["finalizers"] = ["foregroundDeletion"]
                self._write("jobs", job, "MODIFIED")
                for pod in pods:
                    self._delete_pod(namespace, pod["metadata"]["name"])
                self._sync_job(job)
            return 200, job
        if policy not in ("Background", "Foreground"):  # Orphan: dependents lose their owner and stay
            for service in self._objects["services"].values():
                refs = service["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == job["metadata"]["uid"] for r in refs):
                    service["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != job["metadata"]["uid"]]
                    self._write("services", service, "MODIFIED")
        self._remove("jobs", job)
        if policy == "Background":
            self._after(self.step, lambda: [self._delete_pod(namespace, p["metadata"]["name"]) for p in pods])
        else:
            for pod in pods:
                pod["metadata"]["ownerReferences"] = [r for r in pod["metadata"]["ownerReferences"]
                                                      if r["uid"] != job["metadata"]["uid"]]
                self._write("pods", pod, "MODIFIED")
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                     "details": {"name": name, "group": "batch", "kind": "jobs", "uid": job["metadata"]["uid"]}}

    def list_objects(self, resource: str, namespace: str | None, query: dict[str, str]) -> Obj:
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(resource, query.get("fieldSelector"))
        items = []
        for (ns, _), obj in sorted(self._objects[resource].items()):
            if (namespace is None or ns == namespace) and labels(obj["metadata"].get("labels", {})) and fields(obj):
                item = copy.deepcopy(obj)
                del item["apiVersion"], item["kind"]  # list items carry neither, as from the real API server
                items.append(item)
        info = RESOURCES[resource]
        return {"kind": f"{info['kind']}List", "apiVersion": info["apiVersion"],
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}


def _tolerates(toleration: Obj, taint: Obj) -> bool:
    """The kube-scheduler's rule: an empty key with Exists tolerates everything; an empty effect any effect."""
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    operator = toleration.get("operator") or "Equal"
    if not toleration.get("key"):
        return operator == "Exists"
    if toleration["key"] != taint["key"]:
        return False
    return operator == "Exists" or (toleration.get("value") or "") == (taint.get("value") or "")


def index_intervals(indexes: set[int]) -> str:
    """completedIndexes as the Job controller writes it: "0-2,5"."""
    runs: list[list[int]] = []
    for index in sorted(indexes):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def default_requests(spec: Obj) -> None:
    """API defaulting: a container resource with a limit and no request requests its limit."""
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        resources = container.get("resources") or {}
        if resources.get("limits"):
            resources["requests"] = {**resources["limits"], **(resources.get("requests") or {})}


def qos_class(spec: Obj) -> str:
    """Guaranteed when every container's cpu and memory requests equal their limits; BestEffort with none."""
    any_set, guaranteed = False, True
    for container in spec["containers"]:
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        for name in ("cpu", "memory"):
            any_set = any_set or name in limits or name in requests
            if name not in limits or requests.get(name, limits[name]) != limits[name]:
                guaranteed = False
    return "Guaranteed" if guaranteed else "Burstable" if any_set else "BestEffort"


def _split_live(pods: list[Obj]) -> tuple[list[Obj], list[Obj]]:
    """Pods not yet ended: (active, terminating)."""
    live = [p for p in pods if p["status"].get("phase") not in TERMINAL_PHASES]
    return ([p for p in live if not p["metadata"].get("deletionTimestamp")],
            [p for p in live if p["metadata"].get("deletionTimestamp")])


def _field_ref(pod: Obj, path: str) -> str:
    meta = pod["metadata"]
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return meta.get(m.group(1), {}).get(m.group(2), "")
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", ""),
              "metadata.uid": meta["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
              "status.hostIP": pod["status"].get("hostIP", ""), "status.podIP": pod["status"].get("podIP", "")}
    return simple.get(path, "")


# ---------------------------------------------------------------------------------------------------------
# Admission: the few validations that keep a manifest honest for a real cluster

SUPPORTED_FIELD_REFS = re.compile(
    r"metadata\.(name|namespace|uid)|metadata\.(labels|annotations)\['[^']+'\]|spec\.(nodeName|serviceAccountName)"
    r"|status\.(hostIP|hostIPs|podIP|podIPs)"
)
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def invalid(kind: str, name: str, errors: list[tuple[str, str]]) -> ApiError:
    group = "batch" if kind == "Job" else ""
    qualified = f"{kind}.{group}" if group else kind
    message = f'{qualified} "{name}" is invalid: ' + ", ".join(f"{f}: {m}" for f, m in errors)
    causes = [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in errors]
    return ApiError(422, "Invalid", message, {"name": name, "group": group, "kind": kind, "causes": causes})


def _validate_meta(meta: Obj, path: str) -> list[tuple[str, str]]:
    errors = []
    for key, value in (meta.get("labels") or {}).items():
        if not valid_label_key(key):
            errors.append((f"{path}.labels", f"Invalid value: {key!r}: name part must consist of alphanumeric characters"))
        if not valid_label_value(value):
            errors.append((f"{path}.labels", f"Invalid value: {value!r}: a valid label must be an empty string or consist "
                                              "of alphanumeric characters, '-', '_' or '.', at most 63 characters"))
    for key, value in (meta.get("annotations") or {}).items():
        if not valid_label_key(key) or not isinstance(value, str):
            errors.append((f"{path}.annotations", f"Invalid value: {key!r}"))
    return errors


def validate_pod_spec(spec: Obj, path: str, pod_only: bool = False) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    containers = spec.get("containers") or []
    if not containers:
        errors.append((f"{path}.containers", "Required value"))
    for i, container in enumerate(containers):
        where = f"{path}.containers[{i}]"
        if not _DNS_LABEL.match(container.get("name") or ""):
            errors.append((f"{where}.name", f"Invalid value: {container.get('name')!r}"))
        if not container.get("image"):
            errors.append((f"{where}.image", "Required value"))
        for key in ("command", "args"):
            if key in container and not all(isinstance(a, str) for a in container[key]):
                errors.append((f"{where}.{key}", "Invalid value: must be strings"))
        for var in container.get("env") or []:
            if not _ENV_NAME.match(var.get("name") or ""):
                errors.append((f"{where}.env", f"Invalid value: {var.get('name')!r}: a valid environment variable name"))
            ref = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if ref is not None and not SUPPORTED_FIELD_REFS.fullmatch(ref):
                errors.append((f"{where}.env.valueFrom.fieldRef.fieldPath", f"Unsupported value: {ref!r}"))
            if "value" in var and var["value"] is not None and not isinstance(var["value"], str):
                errors.append((f"{where}.env", f"Invalid value: {var['value']!r}: must be a string"))
        resources = container.get("resources") or {}
        quantities: dict[str, dict[str, float]] = {}
        for kind in ("requests", "limits"):
            for name, value in (resources.get(kind) or {}).items():
                try:
                    quantities.setdefault(kind, {})[name] = parse_quantity(value)
                except ValueError as exc:
                    errors.append((f"{where}.resources.{kind}[{name}]", f"Invalid value: {value!r}: {exc}"))
        requests, limits = quantities.get("requests", {}), quantities.get("limits", {})
        for name, amount in requests.items():
            if name in limits and amount > limits[name]:
                errors.append((f"{where}.resources.requests", f"Invalid value: {name} must be less than or equal to limit"))
            if "/" in name and not name.startswith("kubernetes.io/"):  # an extended resource (GPUs)
                if name not in limits:
                    errors.append((f"{where}.resources.limits", f"Required value: Limit must be set for non overcommitable resources ({name})"))
                elif limits[name] != amount:
                    errors.append((f"{where}.resources.requests[{name}]", "Invalid value: must be equal to limit"))
        for name, amount in {**requests, **limits}.items():
            if "/" in name and amount != int(amount):
                errors.append((f"{where}.resources", f"Invalid value: {name} must be an integer"))
    policies = ("Never", "OnFailure") if not pod_only else ("Always", "Never", "OnFailure")
    if spec.get("restartPolicy", "Always") not in policies:
        errors.append((f"{path}.restartPolicy", f'Unsupported value: "{spec.get("restartPolicy", "Always")}": '
                                                 f'supported values: {", ".join(policies)}'))
    for field_name in ("hostname", "subdomain"):
        value = spec.get(field_name)
        if value is not None and not (re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value) and len(value) <= 63):
            errors.append((f"{path}.{field_name}", f'Invalid value: "{value}": a lowercase RFC 1123 label must consist of '
                                                   "lower case alphanumeric characters or '-'"))
    for i, toleration in enumerate(spec.get("tolerations") or []):
        operator = toleration.get("operator") or "Equal"
        if operator not in ("Equal", "Exists"):
            errors.append((f"{path}.tolerations[{i}].operator", f'Unsupported value: "{operator}"'))
        if operator == "Exists" and toleration.get("value"):
            errors.append((f"{path}.tolerations[{i}].operator", "Invalid value: value must be empty when `operator` is 'Exists'"))
        if toleration.get("effect") and toleration["effect"] not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            errors.append((f"{path}.tolerations[{i}].effect", f'Unsupported value: "{toleration["effect"]}"'))
        if not toleration.get("key") and operator != "Exists":
            errors.append((f"{path}.tolerations[{i}].operator", "Invalid value: operator must be Exists when `key` is empty"))
    for key, value in (spec.get("nodeSelector") or {}).items():
        if not valid_label_key(key) or not valid_label_value(value):
            errors.append((f"{path}.nodeSelector", f"Invalid value: {key!r}: {value!r}"))
    return errors


def validate_service(body: Obj) -> list[tuple[str, str]]:
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    errors = _validate_meta(meta, "metadata")
    name = meta.get("name") or ""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(("metadata.name", f'Invalid value: "{name}": a DNS-1035 label must consist of lower case '
                       "alphanumeric characters or '-', start with an alphabetic character, and end with an "
                       "alphanumeric character"))
    headless = spec.get("clusterIP") == "None"
    ports = spec.get("ports") or []
    if not ports and not headless:
        errors.append(("spec.ports", "Required value"))
    for i, port in enumerate(ports):
        if not isinstance(port.get("port"), int) or not 1 <= port["port"] <= 65535:
            errors.append((f"spec.ports[{i}].port", "Invalid value: must be between 1 and 65535, inclusive"))
        if port.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
            errors.append((f"spec.ports[{i}].protocol", f'Unsupported value: "{port.get("protocol")}"'))
        if len(ports) > 1 and not port.get("name"):
            errors.append((f"spec.ports[{i}].name", "Required value"))
    for key, value in (spec.get("selector") or {}).items():
        if not valid_label_key(key) or not valid_label_value(value):
            errors.append(("spec.selector", f"Invalid value: {key!r}: {value!r}"))
    return errors


def validate_job(body: Obj) -> None:
    meta = body.get("metadata") or {}
    name = meta.get("name") or ""
    errors: list[tuple[str, str]] = []
    if not name and not meta.get("generateName"):
        errors.append(("metadata.name", "Required value: name or generateName is required"))
    elif name and (len(name) > 63 or not _DNS_LABEL.match(name)):
        errors.append(("metadata.name", f"Invalid value: {name!r}: a lowercase RFC 1123 label of at most 63 characters"))
    errors += _validate_meta(meta, "metadata")
    spec = body.get("spec") or {}
    template = spec.get("template") or {}
    errors += _validate_meta(template.get("metadata") or {}, "spec.template.metadata")
    errors += validate_pod_spec(template.get("spec") or {}, "spec.template.spec")
    for key in ("parallelism", "completions", "backoffLimit"):
        if key in spec and spec[key] is not None and (not isinstance(spec[key], int) or spec[key] < 0):
            errors.append((f"spec.{key}", f"Invalid value: {spec[key]!r}: must be greater than or equal to 0"))
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or deadline <= 0):
        errors.append(("spec.activeDeadlineSeconds", f"Invalid value: {deadline!r}: must be greater than 0"))
    mode = spec.get("completionMode", "NonIndexed")
    if mode not in ("Indexed", "NonIndexed"):
        errors.append(("spec.completionMode", f'Unsupported value: "{mode}"'))
    if mode == "Indexed" and spec.get("completions") is None:
        errors.append(("spec.completions", "Required value: when completion mode is Indexed"))
    if errors:
        raise invalid("Job", name, errors)


# ---------------------------------------------------------------------------------------------------------
# HTTP


_NS = r"/namespaces/(?P<ns>[a-z0-9-]+)"
_NAME = r"(?P<name>[^/]+)"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a burst of new connections (creates beside 1,000 log streams) is not reset
    fake: FakeKubernetes

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up (a stopped watch, a closed pool) are normal here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as the client's connection pool expects
    timeout = 60
    # Go's net/http (kube-apiserver) sets TCP_NODELAY. Without it the body, written after the headers, waits
    # for the client's delayed ACK (Nagle): 40 ms per answer, which capped a create at ~20/s per connection.
    disable_nagle_algorithm = True
    server: Any

    ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        (m, re.compile(p), h) for m, p, h in [
            ("GET", r"^/version/?$", "version"),
            ("GET", r"^/api/v1/nodes$", "collection"),
            ("GET", rf"^/api/v1/nodes/{_NAME}$", "item"),
            ("GET", r"^/api/v1/pods$", "collection"),
            ("GET", rf"^/api/v1{_NS}/pods$", "collection"),
            ("POST", rf"^/api/v1{_NS}/pods$", "create"),
            ("GET", rf"^/api/v1{_NS}/pods/{_NAME}/log$", "log"),
            ("GET", rf"^/api/v1{_NS}/pods/{_NAME}$", "item"),
            ("DELETE", rf"^/api/v1{_NS}/pods/{_NAME}$", "delete"),
            ("GET", rf"^/api/v1{_NS}/services$", "collection"),
            ("POST", rf"^/api/v1{_NS}/services$", "create"),
            ("GET", rf"^/api/v1{_NS}/services/{_NAME}$", "item"),
            ("DELETE", rf"^/api/v1{_NS}/services/{_NAME}$", "delete"),
            ("GET", r"^/apis/batch/v1/jobs$", "collection"),
            ("GET", rf"^/apis/batch/v1{_NS}/jobs$", "collection"),
            ("POST", rf"^/apis/batch/v1{_NS}/jobs$", "create"),
            ("GET", rf"^/apis/batch/v1{_NS}/jobs/{_NAME}$", "item"),
            ("DELETE", rf"^/apis/batch/v1{_NS}/jobs/{_NAME}$", "delete"),
        ]
    ]

    @property
    def fake(self) -> FakeKubernetes:
        return self.server.fake

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # quiet tests

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = Request(method, url.path, query)
        with self.fake._cond:
            self.fake.requests.append(request)
            injected = next((i for i in self.fake._injected
                             if i.method == method and i.times > 0 and i.path.search(url.path)), None)
            if injected:
                injected.times -= 1
        self.request_record = request
        try:
            if injected:
                reasons = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                           504: "Timeout", 403: "Forbidden"}
                headers = {"Retry-After": str(injected.retry_after)} if injected.retry_after is not None else {}
                raise _Respond(injected.status, status_object(injected.status, reasons.get(injected.status, "Unknown"),
                                                              "injected by the test"), headers)
            for route_method, pattern, handler in self.ROUTES:
                match = pattern.match(url.path)
                if match and route_method == method:
                    if handler != "version":
                        self._negotiate(query, raw)
                    groups = match.groupdict()
                    body = json.loads(raw) if raw else {}
                    answer = getattr(self, f"_{handler}")
                    answer(self._resource(url.path), groups.get("ns"), groups.get("name"), query, body)
                    return
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        except ApiError as error:
            self._json(error.status["code"], error.status)
        except SelectorError as error:
            self._json(400, status_object(400, "BadRequest", str(error)))
        except _Respond as answer:
            self._json(answer.code, answer.body, answer.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _negotiate(self, query: dict[str, str], raw: bytes) -> None:
        """406 / 415 where the real API server refuses the request's media types (see `negotiate`)."""
        accept = self.headers.get("Accept")
        if negotiate(accept) is None:
            self.request_record.refused_accept = accept
            raise ApiError(406, "NotAcceptable", "the server was unable to respond with a content type that the client "
                           f"supports (Accept: {accept!r}); only the following media types are accepted: "
                           + ", ".join(REAL_MEDIA_TYPES))
        # No Content-Type is read as the first serializer's type, JSON (NegotiateInputSerializerForMediaType).
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() or SERVED_MEDIA_TYPE
        if raw and content_type not in REAL_MEDIA_TYPES:
            raise ApiError(415, "UnsupportedMediaType", f'the body of the request was in an unknown format - accepted '
                           f'media types include: {", ".join(REAL_MEDIA_TYPES)} (got {content_type!r})')
        if raw and content_type != SERVED_MEDIA_TYPE:
            raise ApiError(415, "UnsupportedMediaType", f"this fake reads JSON bodies only (got {content_type!r})")

    @staticmethod
    def _resource(path: str) -> str:
        # The collection is the segment after the group version (and namespace): names may look like resources.
        match = re.match(r"^/(?:api/v1|apis/batch/v1)(?:/namespaces/[^/]+)?/(\w+)", path)
        return match.group(1) if match and match.group(1) in RESOURCES else ""

    # -- plain answers ---------------------------------------------------------------------------------------

    def _json(self, code: int, body: Obj, headers: dict[str, str] | None = None) -> None:
        self.request_record.status = code
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _start_chunked(self, content_type: str) -> None:
        self.request_record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _version(self, *_: Any) -> None:
        self._json(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake", "gitCommit": "0" * 40,
                         "gitTreeState": "clean", "buildDate": "2024-08-13T00:00:00Z", "goVersion": "go1.22.5",
                         "compiler": "gc", "platform": "linux/amd64"})

    def _item(self, resource: str, ns: str | None, name: str, query: dict[str, str], body: Obj) -> None:
        with self.fake._cond:
            obj = self.fake._find(resource, ns or "", name)
            if obj is None:
                raise not_found(resource, name)
            data = copy.deepcopy(obj)
        self._json(200, data)

    def _create(self, resource: str, ns: str, name: None, query: dict[str, str], body: Obj) -> None:
        with self.fake._cond:
            create = {"jobs": self.fake.create_job, "services": self.fake.create_service}.get(resource, self.fake.create_pod)
            created = create(ns, body)
            data = copy.deepcopy(created)
        self._json(201, data)

    def _delete(self, resource: str, ns: str, name: str, query: dict[str, str], body: Obj) -> None:
        policy = query.get("propagationPolicy") or body.get("propagationPolicy")
        with self.fake._cond:
            if resource == "jobs":
                code, answer = self.fake.delete_job(ns, name, policy)
            elif resource == "services":
                service = self.fake._find("services", ns, name)
                if service is None:
                    raise not_found("services", name)
                self.fake.deletions.append(("services", ns, name, policy))
                self.fake._write("services", service, "DELETED")
                code, answer = 200, service
            else:
                if self.fake._find("pods", ns, name) is None:
                    raise not_found("pods", name)
                self.fake.deletions.append(("pods", ns, name, policy))
                code, answer = 200, self.fake._delete_pod(ns, name) or {}
            data = copy.deepcopy(answer)
        self._json(code, data)

    def _collection(self, resource: str, ns: str | None, name: None, query: dict[str, str], body: Obj) -> None:
        if query.get("watch") in ("true", "1"):
            self._watch(resource, ns, query)
            return
        with self.fake._cond:
            data = self.fake.list_objects(resource, ns, query)
        self._json(200, data)

    # -- watches ---------------------------------------------------------------------------------------------

    def _watch(self, resource: str, ns: str | None, query: dict[str, str]) -> None:
        fake = self.fake
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(resource, query.get("fieldSelector"))

        def matches(obj: Obj) -> bool:
            meta = obj["metadata"]
            return (ns is None or meta.get("namespace") == ns) and labels(meta.get("labels", {})) and fields(obj)

        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        since = query.get("resourceVersion") or "0"
        if not since.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resource version: {since!r}")
        self._start_chunked("application/json")
        with fake._cond:
            epoch = fake._watch_epoch
            if since == "0":  # no version: the current state as ADDED events, then changes
                initial = [("ADDED", copy.deepcopy(o)) for o in fake._objects[resource].values() if matches(o)]
                cursor = fake._rv
            elif int(since) < fake._compacted_rv:
                # As the real API server does for a watch: 200, then an ERROR event carrying a 410 Status.
                self.request_record.watch_error = 410
                error = status_object(410, "Expired", f"too old resource version: {since} ({fake._compacted_rv})")
                self._send_events([("ERROR", error)])
                self._end_chunked()
                return
            else:
                initial, cursor = [], int(since)
        self._send_events(initial)
        while True:
            with fake._cond:
                while True:
                    start = bisect.bisect_right(fake._history_rvs, cursor)
                    fresh = fake._history[start:]
                    if fresh:
                        cursor = fresh[-1][0]
                    events: list[tuple[str, Obj]] = [(kind, copy.deepcopy(obj)) for _, res, kind, obj in fresh
                                                     if res == resource and matches(obj)]
                    ended = fake._closed or fake._watch_epoch != epoch or time.monotonic() >= deadline
                    if events or ended:
                        break
                    fake._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._send_events(events)
            if ended:
                self._end_chunked()
                return

    def _send_events(self, events: list[tuple[str, Obj]]) -> None:
        if events:
            self._chunk(b"".join(json.dumps({"type": t, "object": o}).encode() + b"\n" for t, o in events))

    # -- logs --------------------------------------------------------------------------------------------------

    def _log(self, resource: str, ns: str, name: str, query: dict[str, str], body: Obj) -> None:
        fake = self.fake
        follow = query.get("follow") in ("true", "1")
        timestamps = query.get("timestamps") in ("true", "1")
        since_ns = 0
        if query.get("sinceTime"):
            try:
                since_ns = parse_rfc3339_ns(query["sinceTime"])
            except ValueError as exc:
                raise ApiError(400, "BadRequest", str(exc)) from None
        elif query.get("sinceSeconds"):
            since_ns = time.time_ns() - int(query["sinceSeconds"]) * 1_000_000_000
        with fake._cond:
            pod = fake._find("pods", ns, name)
            if pod is None:
                raise not_found("pods", name)
            uid = pod["metadata"]["uid"]
            names = [c["name"] for c in pod["spec"]["containers"]]
            container = query.get("container") or names[0]
            if container not in names:
                raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
            if uid not in fake._logs:
                statuses = pod["status"].get("containerStatuses") or []
                waiting = next((s["state"]["waiting"].get("reason", "") for s in statuses if "waiting" in s["state"]),
                               "ContainerCreating")
                what = "trying and failing to pull image" if "Image" in waiting else f"waiting to start: {waiting}"
                raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is {what}')
            epoch = fake._log_epoch
            sent = 0
        if not follow:
            with fake._cond:
                lines = [line for line in fake._logs.get(uid, []) if line[0] >= since_ns]
                text = "".join(self._format(line, timestamps) for line in lines)
            data = text.encode()
            self.request_record.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._start_chunked("text/plain")
        with fake._cond:
            waiter, streams = fake._log_waiters.get(uid) or (threading.Condition(fake._mutex), 0)
            fake._log_waiters[uid] = (waiter, streams + 1)
        try:
            self._follow_log(uid, since_ns, timestamps, epoch, waiter)
        finally:
            with fake._cond:
                waiter, streams = fake._log_waiters[uid]
                if streams > 1:
                    fake._log_waiters[uid] = (waiter, streams - 1)
                else:
                    del fake._log_waiters[uid]

    def _follow_log(self, uid: str, since_ns: int, timestamps: bool, epoch: int, waiter: threading.Condition) -> None:
        fake = self.fake
        sent = 0
        while True:
            with fake._cond:
                while True:
                    lines = fake._logs.get(uid, [])[sent:]
                    sent += len(lines)
                    current = fake._pod_by_uid(uid)
                    running = current is not None and current["status"].get("phase") == "Running"
                    ended = not running or fake._closed or fake._log_epoch != epoch
                    if lines or ended:
                        break
                    waiter.wait(timeout=10.0)  # every change that matters notifies: this is a backstop
            self._chunk("".join(self._format(line, timestamps) for line in lines if line[0] >= since_ns).encode())
            if ended:
                self._end_chunked()
                return

    @staticmethod
    def _format(line: tuple[int, str], timestamps: bool) -> str:
        return f"{rfc3339nano(line[0])} {line[1]}\n" if timestamps else f"{line[1]}\n"


class _Respond(Exception):
    def __init__(self, code: int, body: Obj, headers: dict[str, str]) -> None:
        super().__init__(code)
        self.code, self.body, self.headers = code, body, headers
