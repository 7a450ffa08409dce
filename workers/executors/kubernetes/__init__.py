"""Run jobs as Kubernetes Jobs: one Indexed Job per attempt, one pod per gang member.

The shape follows Airflow's cncf.kubernetes `pod_manager` / `kubernetes_helper_functions`:
- the API client is injected (`app.kube.build_api_client` makes one; nothing is built at import);
- the manifest is a pure function of the job spec (`build_job_manifest`), named after job id + attempt so
  that a redelivered launch meets its own Job (409 AlreadyExists -> adopt it);
- API calls retry only transient errors (429, 5xx, broken connections), honouring Retry-After; the rest fail fast;
- state comes from two shared informers per cluster (all of the service's Jobs, all of its pods), each
  resumed from the last resourceVersion it saw and relisted when that version has expired (410); an
  attempt subscribes to its own objects (a dictionary entry, not a connection);
- what pods and the Job say becomes an Outcome through tables (POD_VERDICTS, JOB_VERDICTS), and
  `pod_failure_details` (pure) goes into Outcome.details;
- every member's log is followed into the sink as produced, resuming after the last timestamp delivered,
  so logs outlive the pods.

Retries are the service's, so Jobs run with backoffLimit 0: one member failing fails the whole gang.

Requests are rate-limited client-side by the API client (`app.kube.RateLimitedApiClient`, QPS and burst as
client-go's). An execution holds one long-lived connection per running member (its log stream); the two
watches are shared, hence the larger connection pool in `app.kube.build_api_client`.

The package, one module per concern:
- `manifest`: names, labels, the Job and a gang's headless Service (pure functions of the spec);
- `outcomes`: what pods and Jobs say, as Outcomes (tables, pure functions);
- `calls`: the retry policy for API calls;
- `watches`: list + watch with resume and 410 relist;
- `informers`: one shared Job informer and one pod informer per executor (cluster), feeding every attempt;
- `records`: the slim records those informers cache (the fields the executor reads, from the API's JSON);
- `logs`: following a member's container log;
- `execution`: one launched Job (`KubernetesExecution`);
- `executor`: `KubernetesExecutor` (launch, adopt, managed Jobs and their retention).
"""
from __future__ import annotations

from workers.executors.kubernetes.manifest import (
    ANNOTATION_ATTEMPT,
    ANNOTATION_CLUSTER,
    ANNOTATION_JOB_ID,
    COMPLETION_INDEX,
    CONTAINER,
    LABEL_ATTEMPT,
    LABEL_JOB_ID,
    LABEL_MANAGED_BY,
    MANAGER,
    MAX_JOB_NAME,
    build_job_manifest,
    build_service_manifest,
    job_name,
    label_value,
    master_address,
    owner_selector,
    service_name,
)
from workers.executors.kubernetes.outcomes import (
    Verdict,
    job_verdict,
    make_outcome,
    member_index,
    pod_facts,
    pod_failure_details,
    pod_verdict,
)
from workers.executors.kubernetes.calls import (
    REQUEST_TIMEOUT,
    RetryPolicy,
    TRANSIENT_STATUSES,
    is_transient,
    retry_after_seconds,
)
from workers.executors.kubernetes.informers import (
    SharedInformer,
    owner_key,
    version_at_least,
)
from workers.executors.kubernetes.logs import (
    parse_log_timestamp,
)
from workers.executors.kubernetes.execution import (
    KubernetesExecution,
    Timings,
)
from workers.executors.kubernetes.executor import (
    KubernetesExecutor,
    ManagedJob,
    Retention,
    jobs_to_delete,
)

__all__ = [
    "SharedInformer",
    "owner_key",
    "version_at_least",
    "ANNOTATION_ATTEMPT",
    "ANNOTATION_CLUSTER",
    "ANNOTATION_JOB_ID",
    "COMPLETION_INDEX",
    "CONTAINER",
    "LABEL_ATTEMPT",
    "LABEL_JOB_ID",
    "LABEL_MANAGED_BY",
    "MANAGER",
    "MAX_JOB_NAME",
    "build_job_manifest",
    "build_service_manifest",
    "job_name",
    "label_value",
    "master_address",
    "owner_selector",
    "service_name",
    "Verdict",
    "job_verdict",
    "make_outcome",
    "member_index",
    "pod_facts",
    "pod_failure_details",
    "pod_verdict",
    "REQUEST_TIMEOUT",
    "RetryPolicy",
    "TRANSIENT_STATUSES",
    "is_transient",
    "retry_after_seconds",
    "parse_log_timestamp",
    "KubernetesExecution",
    "Timings",
    "KubernetesExecutor",
    "ManagedJob",
    "Retention",
    "jobs_to_delete",
]
