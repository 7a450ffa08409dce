"""Kubernetes clusters as the service sees them: API clients, and what each cluster offers: its nodes, their GPUs by type, and what pods already take.

Two list calls per reading (nodes; non-terminal pods of all namespaces), whatever the cluster's size. Usage
counts every pod bound to a node that has not ended, ours or not, the way the kube-scheduler counts it:
a pod's request is the larger of its containers' sum and its largest init container, plus its overhead.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from kubernetes import client, config
from kubernetes.client import ApiClient
from kubernetes.utils import parse_quantity

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "jobservice"
REQUEST_TIMEOUT = (10.0, 30.0)


@dataclass(frozen=True)
class NodeInventory:
    name: str
    cluster: str
    ready: bool  # the node's Ready condition
    schedulable: bool  # not cordoned
    gpu_type: str | None  # the GPU product label, e.g. NVIDIA-A100-SXM4-80GB
    gpu_total: int  # capacity
    gpu_allocatable: int
    cpu_millis: int  # allocatable
    memory_bytes: int  # allocatable
    gpu_used: int  # requested by pods bound here that have not ended
    cpu_used_millis: int
    memory_used_bytes: int
    managed_pods_running: int  # pods of this service running here
    pods_allocatable: int = 110
    # What pods of others (not this service) take: the service accounts for its own jobs itself.
    foreign_gpu_used: int = 0
    foreign_cpu_used_millis: int = 0
    foreign_memory_used_bytes: int = 0

    @property
    def gpu_free(self) -> int:
        return max(0, self.gpu_allocatable - self.gpu_used)

    @property
    def cpu_free_millis(self) -> int:
        return max(0, self.cpu_millis - self.cpu_used_millis)

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_bytes - self.memory_used_bytes)


def _amount(quantities: dict[str, str] | None, resource: str) -> Decimal:
    value = (quantities or {}).get(resource)
    return parse_quantity(value) if value is not None else Decimal(0)


def _container_request(container: client.V1Container, resource: str) -> Decimal:
    resources = container.resources
    if resources is None:
        return Decimal(0)
    # The API server defaults a missing request to the limit; objects that skipped defaulting still count.
    source = resources.requests if resources.requests and resource in resources.requests else resources.limits
    return _amount(source, resource)


def pod_request(pod: client.V1Pod, resource: str) -> Decimal:
    spec = pod.spec
    if spec is None:
        return Decimal(0)
    running = sum((_container_request(c, resource) for c in spec.containers or []), Decimal(0))
    init = max((_container_request(c, resource) for c in spec.init_containers or []), default=Decimal(0))
    return max(running, init) + _amount(spec.overhead, resource)


def _node_ready(node: client.V1Node) -> bool:
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def read_inventory(
    api_client: ApiClient,
    cluster: str,
    gpu_resource: str = "nvidia.com/gpu",
    gpu_product_label: str = "nvidia.com/gpu.product",
) -> list[NodeInventory]:
    core = client.CoreV1Api(api_client)
    nodes = core.list_node(_request_timeout=REQUEST_TIMEOUT).items or []
    pods = core.list_pod_for_all_namespaces(
        field_selector="status.phase!=Succeeded,status.phase!=Failed", _request_timeout=REQUEST_TIMEOUT
    ).items or []
    used: dict[str, dict[str, Decimal]] = {}
    foreign: dict[str, dict[str, Decimal]] = {}
    ours: dict[str, int] = {}
    for pod in pods:
        node_name = pod.spec.node_name if pod.spec else None
        if not node_name:
            continue  # not scheduled: takes nothing yet
        managed = (pod.metadata.labels or {}).get(MANAGED_BY_LABEL) == MANAGER
        for totals in (used.setdefault(node_name, {}),) + (() if managed else (foreign.setdefault(node_name, {}),)):
            for resource in ("cpu", "memory", gpu_resource):
                totals[resource] = totals.get(resource, Decimal(0)) + pod_request(pod, resource)
        if managed and pod.status is not None and pod.status.phase == "Running":
            ours[node_name] = ours.get(node_name, 0) + 1
    inventory = []
    for node in nodes:
        name = node.metadata.name
        status = node.status or client.V1NodeStatus()
        totals = used.get(name, {})
        others = foreign.get(name, {})
        inventory.append(
            NodeInventory(
                name=name,
                cluster=cluster,
                ready=_node_ready(node),
                schedulable=not (node.spec and node.spec.unschedulable),
                gpu_type=(node.metadata.labels or {}).get(gpu_product_label),
                gpu_total=int(_amount(status.capacity, gpu_resource)),
                gpu_allocatable=int(_amount(status.allocatable, gpu_resource)),
                cpu_millis=int(_amount(status.allocatable, "cpu") * 1000),
                memory_bytes=int(_amount(status.allocatable, "memory")),
                gpu_used=math.ceil(totals.get(gpu_resource, Decimal(0))),
                cpu_used_millis=math.ceil(totals.get("cpu", Decimal(0)) * 1000),
                memory_used_bytes=math.ceil(totals.get("memory", Decimal(0))),
                managed_pods_running=ours.get(name, 0),
                pods_allocatable=int(_amount(status.allocatable, "pods")) or 110,  # the kubelet default
                foreign_gpu_used=math.ceil(others.get(gpu_resource, Decimal(0))),
                foreign_cpu_used_millis=math.ceil(others.get("cpu", Decimal(0)) * 1000),
                foreign_memory_used_bytes=math.ceil(others.get("memory", Decimal(0))),
            )
        )
    return inventory


def check_cluster(api_client: ApiClient, timeout: float = 5.0) -> str:
    """"ok" when the API server answers, else "error" (for readiness checks: never raises).

    /version needs no permissions, so this says the server is reachable, not that our RBAC is right.
    """
    try:
        client.VersionApi(api_client).get_code(_request_timeout=timeout)
    except Exception:  # noqa: BLE001 - any failure means not ready
        return "error"
    return "ok"

@dataclass
class TokenBucket:
    """client-go's client-side rate limiter (flowcontrol.NewTokenBucketRateLimiter): `qps` tokens a second, up
    to `burst` saved; each request takes one, waiting for it when none is left. qps <= 0: no limit."""

    qps: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    taken: int = 0  # requests let through (for tests and benchmarks)
    waited_seconds: float = 0.0
    _tokens: float = field(init=False)
    _at: float = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.burst = max(1, int(self.burst))
        self._tokens, self._at = float(self.burst), self.clock()

    def acquire(self) -> float:
        """Take a token, waiting as long as needed; returns the wait. Waiters are served in turn: a token
        is reserved under the lock (the balance may go negative) and the wait happens outside it."""
        if self.qps <= 0:
            with self._lock:
                self.taken += 1
            return 0.0
        with self._lock:
            now = self.clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1
            wait = max(0.0, -self._tokens / self.qps)
            self.taken += 1
            self.waited_seconds += wait
        if wait > 0:
            self.sleep(wait)
        return wait


class RateLimitedApiClient(ApiClient):
    """An API client whose every request (calls, lists, watches, log streams) first takes a token from a
    shared limiter, as client-go's REST client does. 429 and 5xx are retried, honouring Retry-After, by the
    callers' retry policy (workers.executors.kubernetes.calls)."""

    def __init__(self, configuration: client.Configuration, limiter: TokenBucket) -> None:
        super().__init__(configuration)
        self.limiter = limiter

    def call_api(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        self.limiter.acquire()
        return super().call_api(*args, **kwargs)  # type: ignore[arg-type]


def tune_configuration(configuration: client.Configuration, pool_maxsize: int = 64) -> client.Configuration:
    """Every watch and log stream holds a connection for its lifetime; the default pool (cpu_count * 5)
    would make the rest open and throw away a connection per request."""
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, pool_maxsize)
    return configuration


def build_api_client(kubeconfig: str | None = None, context: str | None = None, *, pool_maxsize: int = 64,
                     qps: float = 50.0, burst: int = 100) -> ApiClient:
    """An API client from the pod's service account (in a cluster, when no kubeconfig or context is named)
    or from a kubeconfig file and context.

    The Python client has no rate limiter of its own: every request of this one takes a token from a
    client-side token bucket (`qps`, `burst`; KUBERNETES_QPS / KUBERNETES_BURST), as client-go's does.
    """
    configuration = client.Configuration()
    limiter = TokenBucket(qps, burst)
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return RateLimitedApiClient(tune_configuration(configuration, pool_maxsize), limiter)
        except config.ConfigException:
            pass  # not in a cluster: the default kubeconfig
    config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration,
                            persist_config=False)
    return RateLimitedApiClient(tune_configuration(configuration, pool_maxsize), limiter)


class ClusterClients:
    """One API client per configured cluster, built on first use (never at import) and then shared."""

    def __init__(self, clusters: tuple[tuple[str, str | None], ...], kubeconfig: str | None,
                 qps: float = 50.0, burst: int = 100) -> None:
        self.contexts = dict(clusters)
        self.kubeconfig = kubeconfig
        self.qps, self.burst = qps, burst
        self._clients: dict[str, ApiClient] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.contexts)

    def client(self, name: str) -> ApiClient:
        with self._lock:
            if name not in self._clients:
                context = self.contexts[name]
                self._clients[name] = build_api_client(self.kubeconfig if context else None, context,
                                                       qps=self.qps, burst=self.burst)
            return self._clients[name]
