"""Configuration: the only module that reads environment variables.

Every setting has an embedded default so that the service runs with no configuration at all;
`Settings.from_env()` reads the environment once, and everything else receives the result.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, replace
from typing import Mapping


@dataclass(frozen=True)
class QueueConfig:
    """A logical queue: jobs whose priority lies in [min_priority, max_priority] land in it."""

    name: str
    min_priority: int
    max_priority: int
    max_concurrency: int


DEFAULT_QUEUES = "high-priority:50-100:50,default:0-49:100"


def parse_queues(spec: str) -> tuple[QueueConfig, ...]:
    """Parse `name:min-max:max_concurrency,...`, e.g. `high-priority:50-100:50,default:0-49:100`."""
    queues = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            name, band, concurrency = item.split(":")
            low, high = band.split("-")
            queues.append(QueueConfig(name, int(low), int(high), int(concurrency)))
        except ValueError as exc:
            raise ValueError(f"JOB_QUEUES entry {item!r} is not name:min-max:max_concurrency") from exc
    covered = sorted(p for q in queues for p in range(q.min_priority, q.max_priority + 1))
    if covered != list(range(0, 101)):
        raise ValueError("JOB_QUEUES bands must cover priorities 0..100 exactly once")
    return tuple(sorted(queues, key=lambda q: -q.max_priority))


_CGROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_cgroup(value: str) -> str:
    """WORKER_CGROUP: `auto`, `off`, an absolute cgroup v2 folder, or a folder name beside the worker's cgroup.
    A relative path is refused: it would name a plain folder under the worker's working directory."""
    value = value.strip() or "auto"
    if value in ("auto", "off") or _CGROUP_NAME.fullmatch(value):
        return value
    if value.startswith("/") and "\0" not in value and "/../" not in f"{value}/" and len(value) <= 4096:
        return value
    raise ValueError(f"WORKER_CGROUP {value!r} is not auto, off, an absolute path or a folder name ([A-Za-z0-9._-], 64 at most)")


def parse_launcher(value: str) -> str:
    """WORKER_LAUNCHER: `auto` (build workers/executors/launcher.c once), `off` (sh and setpriv) or the absolute
    path of a launcher built elsewhere."""
    value = value.strip() or "auto"
    if value in ("auto", "off"):
        return value
    if value.startswith("/") and "\0" not in value and len(value) <= 4096:
        return value
    raise ValueError(f"WORKER_LAUNCHER {value!r} is not auto, off or an absolute path")


def parse_clusters(spec: str) -> tuple[tuple[str, str | None], ...]:
    """`name=context,...`; the context `in-cluster` (or none) means the pod's service account."""
    clusters = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, context = item.partition("=")
        if not name or name == "local":
            raise ValueError(f"KUBERNETES_CLUSTERS entry {item!r}: a cluster needs a name other than 'local'")
        clusters.append((name, None if context in ("", "in-cluster") else context))
    return tuple(clusters)


def parse_weights(spec: str) -> tuple[tuple[str, float], ...]:
    """`owner=weight,...`, e.g. `team-a=2,batch=0.5`; owners not listed weigh 1."""
    weights = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        owner, _, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not owner or not 0 < weight < 1e6:
            raise ValueError(f"FAIR_SHARE_WEIGHTS entry {item!r} is not owner=weight with 0 < weight < 1e6")
        weights.append((owner, weight))
    return tuple(weights)


TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
DEFAULT_GPU_TOLERATIONS = "nvidia.com/gpu:NoSchedule"


def parse_tolerations(spec: str) -> tuple[tuple[str, str | None, str | None], ...]:
    """`key[=value][:effect],...` -> (key, value, effect): a pod tolerates the taint `key` (any value when
    none is given: operator Exists) with that effect (any effect when none is given)."""
    tolerations = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        rest, _, effect = item.partition(":")
        key, equals, value = rest.partition("=")
        if not re.fullmatch(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", key.strip()):
            raise ValueError(f"KUBERNETES_GPU_TOLERATIONS entry {item!r}: {key!r} is not a taint key")
        if effect and effect not in TAINT_EFFECTS:
            raise ValueError(f"KUBERNETES_GPU_TOLERATIONS entry {item!r}: the effect must be one of {', '.join(TAINT_EFFECTS)}")
        if equals and (len(value) > 63 or not re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", value)):
            raise ValueError(f"KUBERNETES_GPU_TOLERATIONS entry {item!r}: {value!r} is not a label value")
        tolerations.append((key.strip(), value if equals else None, effect or None))
    return tuple(tolerations)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return int(env.get(name, default))


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    return float(env.get(name, default))


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


@dataclass(frozen=True)
class Settings:
    # Where things live. None means "start the embedded server" (see app.embedded).
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: str = ".jobservice"
    embedded_redis_port: int = 6390
    flower_port: int = 5555
    port: int = 8000

    # API
    max_content_length: int = 1024 * 1024
    log_level: str = "INFO"
    log_format: str = "json"

    # gunicorn (config/gunicorn.py) and follow streams (app.api.streams)
    web_concurrency: int = 2
    web_worker_connections: int = 4096
    web_graceful_timeout_seconds: float = 5.0
    stream_max_seconds: float = 3600.0
    stream_keepalive_seconds: float = 15.0
    stream_poll_seconds: float = 0.25
    streams_per_caller: int = 20
    streams_per_process: int = 1000
    stream_slot_lease_seconds: float = 60.0

    # Authentication (JWT) and rate limits
    auth_enabled: bool = True
    jwt_secret_key: str | None = None
    jwt_public_key: str | None = None
    jwt_jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_scope_claim: str = "scope"
    jwt_tenant_claim: str | None = None
    jwt_leeway_seconds: int = 0
    jwks_cache_seconds: int = 300
    ratelimit_enabled: bool = True
    ratelimit_submit: str = "100/minute"
    ratelimit_list: str = "300/minute"
    ratelimit_default: str = "600/minute"
    jwt_max_token_lifetime_seconds: int = 31 * 86400
    max_batch_jobs: int = 1000
    idempotency_key_ttl_seconds: int = 86400

    # Input bounds (the API answers 400 beyond them; the OpenAPI document states them)
    max_job_timeout_seconds: int = 7 * 86400
    max_retries: int = 100
    max_gang_members: int = 64
    max_job_gpus: int = 64
    max_job_cpu: str = "1024"
    max_job_memory: str = "64Ti"

    # Scheduling
    queues: tuple[QueueConfig, ...] = field(default_factory=lambda: parse_queues(DEFAULT_QUEUES))
    scheduler_interval_seconds: float = 2.0
    outbox_republish_after_seconds: float = 5.0
    claim_timeout_seconds: float = 10.0
    job_heartbeat_seconds: float = 5.0
    job_lease_seconds: float = 30.0
    node_lease_seconds: float = 30.0
    retry_backoff_base_seconds: float = 10.0
    retry_backoff_max_seconds: float = 3600.0
    scheduler_health_intervals: float = 5.0
    scheduler_reservation_depth: int = 4
    scheduler_scan_limit: int = 2000
    fair_share_half_life_seconds: float = 3600.0
    fair_share_weights: tuple[tuple[str, float], ...] = ()
    fair_share_priority_band: int = 1
    preemption_enabled: bool = True
    preemption_min_run_seconds: float = 60.0  # a job runs at least this long before it may be preempted (no loops)
    preemption_max_per_minute: int = 60  # per cluster, at least: a bad priority setting cannot churn the fleet
    # ... raised to this many per node of the cluster: the guard scales with the fleet (a fixed 60 held a
    # 1,000-GPU cluster's urgent burst back for minutes; the simulator's burst needs up to 188 a minute on 150 nodes)
    preemption_max_per_node_per_minute: float = 2.0
    preemption_protect_priority: int = 50  # above it, only admins may submit `preemptible: false`
    quotas_file: str | None = None  # JSON {tenant: [quota entries as PUT /quotas/{tenant} takes them]}, seeded at scheduler start
    log_retention_days: int = 30
    log_max_lines_per_attempt: int = 100_000
    log_max_bytes_per_attempt: int = 10 * 1024 * 1024
    log_max_line_bytes: int = 16_384

    # Worker (one worker = one node of the `local` cluster)
    worker_node: str = field(default_factory=socket.gethostname)
    worker_gpus: tuple[int, ...] | None = None
    worker_gpu_count: int | None = None
    worker_gpu_type: str | None = None
    worker_pool: str = "default"  # the pool this worker's node(s) serve: jobs naming another pool never land here
    job_pools: tuple[str, ...] = ()  # pools jobs may name while none of their nodes is known (scaled to zero)
    worker_cpu: str | None = None
    worker_memory: str | None = None
    worker_concurrency: int = 4
    worker_workdir: str = ".jobservice/work"
    kill_grace_seconds: float = 10.0
    worker_drain_seconds: float = 30.0
    worker_cgroup: str = "auto"
    worker_launcher: str = "auto"
    nvidia_smi: str = "nvidia-smi"

    # Kubernetes: named clusters, each a kubeconfig context (or the in-cluster service account)
    kubernetes_clusters: tuple[tuple[str, str | None], ...] = ()
    kubeconfig: str | None = None
    kubernetes_namespace: str = "jobservice"
    kubernetes_gpu_resource: str = "nvidia.com/gpu"
    kubernetes_gpu_product_label: str = "nvidia.com/gpu.product"
    kubernetes_service_account: str | None = None
    gang_start_timeout_seconds: float = 600.0
    inventory_sync_seconds: float = 10.0
    # Finished Kubernetes Jobs (and their pods, logs, events) are kept this long; a failed one at least as
    # long as a succeeded one (from_env raises the failed TTL to the succeeded one).
    kubernetes_job_ttl_succeeded_seconds: float = 3600.0
    kubernetes_job_ttl_failed_seconds: float = 86400.0
    # Pods that request GPUs tolerate these taints (GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule).
    # Client-side rate limit of each Kubernetes API client (client-go's QPS/burst); qps 0: unlimited.
    kubernetes_qps: float = 50.0
    kubernetes_burst: int = 100
    # Running Kubernetes attempts one worker process supervises at once (its informer-driven loop, not a
    # thread each); also the slot count of each of the cluster's nodes, so the scheduler never admits more.
    kubernetes_max_supervised: int = 1000
    kubernetes_gpu_tolerations: tuple[tuple[str, str | None, str | None], ...] = field(
        default_factory=lambda: parse_tolerations(DEFAULT_GPU_TOLERATIONS))
    worker_executor: str = "local"
    worker_cluster: str | None = None

    # `jobservice run`: restarts with backoff, graceful stop; liveness files for the exec probes
    restart_backoff_seconds: float = 1.0
    restart_backoff_max_seconds: float = 30.0
    stop_grace_seconds: float = 30.0
    heartbeat_dir: str = ".jobservice/heartbeats"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        gpus = _optional(env, "WORKER_GPUS")
        gpu_count = _optional(env, "WORKER_GPU_COUNT")
        return cls(
            database_url=_optional(env, "DATABASE_URL"),
            redis_url=_optional(env, "REDIS_URL"),
            data_dir=env.get("JOBSERVICE_DATA_DIR", ".jobservice"),
            embedded_redis_port=_int(env, "EMBEDDED_REDIS_PORT", 6390),
            flower_port=_int(env, "FLOWER_PORT", 5555),
            port=_int(env, "PORT", 8000),
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", 1024 * 1024),
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            log_format=env.get("LOG_FORMAT", "json"),
            web_concurrency=_int(env, "WEB_CONCURRENCY", 2),
            web_worker_connections=_int(env, "WEB_WORKER_CONNECTIONS", 4096),
            web_graceful_timeout_seconds=_float(env, "WEB_GRACEFUL_TIMEOUT_SECONDS", 5.0),
            stream_max_seconds=_float(env, "STREAM_MAX_SECONDS", 3600.0),
            stream_keepalive_seconds=_float(env, "STREAM_KEEPALIVE_SECONDS", 15.0),
            stream_poll_seconds=_float(env, "STREAM_POLL_SECONDS", 0.25),
            streams_per_caller=_int(env, "STREAMS_PER_CALLER", 20),
            streams_per_process=_int(env, "STREAMS_PER_PROCESS", 1000),
            stream_slot_lease_seconds=_float(env, "STREAM_SLOT_LEASE_SECONDS", 60.0),
            auth_enabled=_bool(env, "AUTH_ENABLED", True),
            jwt_secret_key=_optional(env, "JWT_SECRET_KEY"),
            jwt_public_key=_optional(env, "JWT_PUBLIC_KEY"),
            jwt_jwks_url=_optional(env, "JWT_JWKS_URL"),
            jwt_algorithms=tuple(
                a.strip() for a in env.get("JWT_ALGORITHMS", "HS256").split(",") if a.strip()
            ),
            jwt_issuer=_optional(env, "JWT_ISSUER"),
            jwt_audience=_optional(env, "JWT_AUDIENCE"),
            jwt_scope_claim=env.get("JWT_SCOPE_CLAIM", "scope"),
            jwt_tenant_claim=_optional(env, "JWT_TENANT_CLAIM"),
            jwt_leeway_seconds=_int(env, "JWT_LEEWAY_SECONDS", 0),
            jwks_cache_seconds=_int(env, "JWKS_CACHE_SECONDS", 300),
            ratelimit_enabled=_bool(env, "RATELIMIT_ENABLED", True),
            ratelimit_submit=env.get("RATELIMIT_SUBMIT", "100/minute"),
            ratelimit_list=env.get("RATELIMIT_LIST", "300/minute"),
            ratelimit_default=env.get("RATELIMIT_DEFAULT", "600/minute"),
            jwt_max_token_lifetime_seconds=_int(env, "JWT_MAX_TOKEN_LIFETIME_SECONDS", 31 * 86400),
            max_batch_jobs=max(1, _int(env, "MAX_BATCH_JOBS", 1000)),
            idempotency_key_ttl_seconds=max(1, _int(env, "IDEMPOTENCY_KEY_TTL_SECONDS", 86400)),
            max_job_timeout_seconds=_int(env, "MAX_JOB_TIMEOUT_SECONDS", 7 * 86400),
            max_retries=_int(env, "MAX_RETRIES", 100),
            max_gang_members=_int(env, "MAX_GANG_MEMBERS", 64),
            max_job_gpus=_int(env, "MAX_JOB_GPUS", 64),
            max_job_cpu=env.get("MAX_JOB_CPU", "1024"),
            max_job_memory=env.get("MAX_JOB_MEMORY", "64Ti"),
            queues=parse_queues(env.get("JOB_QUEUES", DEFAULT_QUEUES)),
            scheduler_interval_seconds=_float(env, "SCHEDULER_INTERVAL_SECONDS", 2.0),
            outbox_republish_after_seconds=_float(env, "OUTBOX_REPUBLISH_AFTER_SECONDS", 5.0),
            claim_timeout_seconds=_float(env, "CLAIM_TIMEOUT_SECONDS", 10.0),
            job_heartbeat_seconds=_float(env, "JOB_HEARTBEAT_SECONDS", 5.0),
            job_lease_seconds=_float(env, "JOB_LEASE_SECONDS", 30.0),
            node_lease_seconds=_float(env, "NODE_LEASE_SECONDS", 30.0),
            retry_backoff_base_seconds=_float(env, "RETRY_BACKOFF_BASE_SECONDS", 10.0),
            retry_backoff_max_seconds=_float(env, "RETRY_BACKOFF_MAX_SECONDS", 3600.0),
            scheduler_health_intervals=_float(env, "SCHEDULER_HEALTH_INTERVALS", 5.0),
            # Bounded: each reservation is a timeline search in every pass; a scan limit below 1 would admit nothing.
            scheduler_reservation_depth=min(1000, max(0, _int(env, "SCHEDULER_RESERVATION_DEPTH", 4))),
            scheduler_scan_limit=min(1_000_000, max(1, _int(env, "SCHEDULER_SCAN_LIMIT", 2000))),
            fair_share_half_life_seconds=_float(env, "FAIR_SHARE_HALF_LIFE_SECONDS", 3600.0),
            fair_share_weights=parse_weights(env.get("FAIR_SHARE_WEIGHTS", "")),
            fair_share_priority_band=min(101, max(1, _int(env, "FAIR_SHARE_PRIORITY_BAND", 1))),
            quotas_file=_optional(env, "QUOTAS_FILE"),
            preemption_enabled=_bool(env, "PREEMPTION_ENABLED", True),
            preemption_min_run_seconds=max(0.0, _float(env, "PREEMPTION_MIN_RUN_SECONDS", 60.0)),
            preemption_max_per_minute=min(1_000_000, max(0, _int(env, "PREEMPTION_MAX_PER_MINUTE", 60))),
            # Bounded: `inf` would overflow the limit's arithmetic in every pass (NaN falls to 0).
            preemption_max_per_node_per_minute=min(1000.0, max(0.0, _float(env, "PREEMPTION_MAX_PER_NODE_PER_MINUTE", 2.0))),
            preemption_protect_priority=min(100, max(0, _int(env, "PREEMPTION_PROTECT_PRIORITY", 50))),
            log_retention_days=_int(env, "LOG_RETENTION_DAYS", 30),
            log_max_lines_per_attempt=max(1, _int(env, "LOG_MAX_LINES_PER_ATTEMPT", 100_000)),
            log_max_bytes_per_attempt=max(1, _int(env, "LOG_MAX_BYTES_PER_ATTEMPT", 10 * 1024 * 1024)),
            log_max_line_bytes=min(16_384, max(64, _int(env, "LOG_MAX_LINE_BYTES", 16_384))),
            worker_node=env.get("WORKER_NODE") or socket.gethostname(),
            worker_gpus=tuple(int(g) for g in gpus.split(",")) if gpus else None,
            worker_gpu_count=int(gpu_count) if gpu_count else None,
            worker_gpu_type=_optional(env, "WORKER_GPU_TYPE"),
            worker_pool=_optional(env, "WORKER_POOL") or "default",
            job_pools=tuple(p.strip() for p in env.get("JOB_POOLS", "").split(",") if p.strip()),
            worker_cpu=_optional(env, "WORKER_CPU"),
            worker_memory=_optional(env, "WORKER_MEMORY"),
            worker_concurrency=_int(env, "WORKER_CONCURRENCY", 4),
            worker_workdir=env.get("WORKER_WORKDIR", os.path.join(env.get("JOBSERVICE_DATA_DIR", ".jobservice"), "work")),
            kill_grace_seconds=_float(env, "KILL_GRACE_SECONDS", 10.0),
            worker_drain_seconds=min(86400.0, max(0.0, _float(env, "WORKER_DRAIN_SECONDS", 30.0))),
            worker_cgroup=parse_cgroup(env.get("WORKER_CGROUP", "auto")),
            worker_launcher=parse_launcher(env.get("WORKER_LAUNCHER", "auto")),
            nvidia_smi=env.get("NVIDIA_SMI", "nvidia-smi"),
            kubernetes_clusters=parse_clusters(env.get("KUBERNETES_CLUSTERS", "")),
            kubeconfig=_optional(env, "KUBECONFIG"),
            kubernetes_namespace=env.get("KUBERNETES_NAMESPACE", "jobservice"),
            kubernetes_gpu_resource=env.get("KUBERNETES_GPU_RESOURCE", "nvidia.com/gpu"),
            kubernetes_gpu_product_label=env.get("KUBERNETES_GPU_PRODUCT_LABEL", "nvidia.com/gpu.product"),
            kubernetes_service_account=_optional(env, "KUBERNETES_SERVICE_ACCOUNT"),
            gang_start_timeout_seconds=_float(env, "GANG_START_TIMEOUT_SECONDS", 600.0),
            inventory_sync_seconds=_float(env, "INVENTORY_SYNC_SECONDS", 10.0),
            kubernetes_qps=min(100_000.0, max(0.0, _float(env, "KUBERNETES_QPS", 50.0))),
            kubernetes_burst=min(100_000, max(1, _int(env, "KUBERNETES_BURST", 100))),
            kubernetes_max_supervised=min(100_000, max(1, _int(env, "KUBERNETES_MAX_SUPERVISED", 1000))),
            kubernetes_gpu_tolerations=parse_tolerations(env.get("KUBERNETES_GPU_TOLERATIONS", DEFAULT_GPU_TOLERATIONS)),
            kubernetes_job_ttl_succeeded_seconds=max(0.0, _float(env, "KUBERNETES_JOB_TTL_SUCCEEDED_SECONDS", 3600.0)),
            kubernetes_job_ttl_failed_seconds=max(
                0.0,
                _float(env, "KUBERNETES_JOB_TTL_SUCCEEDED_SECONDS", 3600.0),
                _float(env, "KUBERNETES_JOB_TTL_FAILED_SECONDS", 86400.0),
            ),
            worker_executor=env.get("WORKER_EXECUTOR", "local"),
            worker_cluster=_optional(env, "WORKER_CLUSTER"),
            restart_backoff_seconds=_float(env, "RESTART_BACKOFF_SECONDS", 1.0),
            restart_backoff_max_seconds=_float(env, "RESTART_BACKOFF_MAX_SECONDS", 30.0),
            stop_grace_seconds=_float(env, "STOP_GRACE_SECONDS", 30.0),
            heartbeat_dir=env.get("HEARTBEAT_DIR", os.path.join(env.get("JOBSERVICE_DATA_DIR", ".jobservice"), "heartbeats")),
        )

    def with_overrides(self, **changes: object) -> "Settings":
        return replace(self, **changes)

    def queue_for_priority(self, priority: int) -> QueueConfig:
        for queue in self.queues:
            if queue.min_priority <= priority <= queue.max_priority:
                return queue
        raise ValueError(f"no queue for priority {priority}")

    def queue_named(self, name: str) -> QueueConfig | None:
        return next((q for q in self.queues if q.name == name), None)


def flask_config(settings: Settings) -> dict[str, object]:
    """The Flask/extension configuration derived from settings."""
    return {
        "JOBSERVICE_SETTINGS": settings,
        "MAX_CONTENT_LENGTH": settings.max_content_length,
        "JSON_SORT_KEYS": False,
        "API_TITLE": "Job Service",
        "API_VERSION": "v1",
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/api/v1",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "docs",
        # Swagger UI's assets come from the pinned swagger-ui-bundle package (app.api.docs): the page works
        # offline and shows what was installed, not whatever a CDN serves today.
        "OPENAPI_SWAGGER_UI_URL": "/api/v1/docs/assets/",
        # Swagger UI would send the document to validator.swagger.io for a badge: nothing leaves the machine.
        "OPENAPI_SWAGGER_UI_CONFIG": {"validatorUrl": None},
    }


@dataclass(frozen=True)
class ClientSettings:
    """Defaults of the `jobservice` client commands (jobservice_cli): flags override these variables, and
    these override the config file (`url`, `token` and `output` keys in TOML)."""

    url: str | None = None
    token: str | None = None
    config_file: str = "~/.config/jobservice/config.toml"
    # Set by the shell while it asks for completions (click's protocol): the client must answer it.
    completing: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ClientSettings":
        env = os.environ if env is None else env
        config_home = _optional(env, "XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return cls(
            url=_optional(env, "JOBSERVICE_URL"),
            token=_optional(env, "JOBSERVICE_TOKEN"),
            config_file=_optional(env, "JOBSERVICE_CONFIG") or os.path.join(config_home, "jobservice", "config.toml"),
            completing=bool(_optional(env, "_JOBSERVICE_COMPLETE")),
        )
