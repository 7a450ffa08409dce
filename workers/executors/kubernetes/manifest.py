"""Names, labels and the manifests: a pure function of the job spec (the Job; a gang's headless Service)."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from kubernetes import client

from workers.executors.base import DEFAULT_MASTER_PORT, RANK_VARIABLES, JobSpec


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


def service_name(job: str) -> str:
    """The headless Service of a gang's Job: the Job's name, which must here also be a DNS-1035 label."""
    return job if job[:1].isalpha() else f"s{job}"[:MAX_JOB_NAME + 1].rstrip("-")


def master_address(job: str, namespace: str) -> str:
    """Member 0's stable DNS name: `<hostname>.<subdomain>.<namespace>.svc` (Indexed pods are named
    `<job>-<index>` as hosts; the subdomain is the headless Service)."""
    return f"{job}-0.{service_name(job)}.{namespace}.svc"


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
    gpu_tolerations: Iterable[tuple[str, str | None, str | None]] = (),
    gpu_product_label: str | None = None,
) -> client.V1Job:
    """The batch/v1 Job for one attempt of `spec`: Indexed, one completion per gang member, no retries.

    Quantities are strings (the client validates them as such). JOB_RANK, RANK and NODE_RANK come from the
    pod's completion index through the downward API, so every member sees its own rank from one shared
    template. A gang's pods live under the subdomain of a headless Service (`build_service_manifest`), so
    MASTER_ADDR (member 0) resolves; a single member rendezvouses with itself on 127.0.0.1.
    Pods that request GPUs tolerate `gpu_tolerations` and, when the scheduler counted a GPU model
    (spec.gpu_type), select nodes of that model by `gpu_product_label`.
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

    gang = spec.members > 1
    spec = spec.with_rendezvous(master_address(name, namespace) if gang else "127.0.0.1", DEFAULT_MASTER_PORT)
    # The service's variables win over the job's own; the ranks are per pod, from the completion index.
    variables = {**spec.env, **spec.base_environment(rank=0)}
    env = [
        client.V1EnvVar(
            name=key,
            value_from=client.V1EnvVarSource(
                field_ref=client.V1ObjectFieldSelector(field_path=f"metadata.annotations['{COMPLETION_INDEX}']")
            ),
        )
        if key in RANK_VARIABLES
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
    tolerations = [
        client.V1Toleration(key=key, operator="Equal" if value is not None else "Exists", value=value, effect=effect)
        for key, value, effect in gpu_tolerations
    ] if spec.gpus > 0 else []
    node_selector = {gpu_product_label: spec.gpu_type} if spec.gpus > 0 and spec.gpu_type and gpu_product_label else None
    pod_spec = client.V1PodSpec(
        containers=[container],
        restart_policy="Never",
        # Service links put an env var per Service of the namespace into every container: noise, and slow at scale.
        enable_service_links=False,
        affinity=affinity,
        service_account_name=service_account_name,
        subdomain=service_name(name) if gang else None,
        tolerations=tolerations or None,
        node_selector=node_selector,
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


def build_service_manifest(spec: JobSpec, namespace: str, job: client.V1Job) -> client.V1Service:
    """The headless Service that gives a gang's members DNS names (`<job>-<index>.<service>`), as JobSet and
    PyTorchJob do. Owned by the Job, so the garbage collector removes it with the Job and its pods.
    Not-ready addresses are published: members resolve each other before any is Ready."""
    name = job.metadata.name
    labels = {LABEL_MANAGED_BY: MANAGER, LABEL_JOB_ID: label_value(spec.job_id), LABEL_ATTEMPT: str(spec.attempt)}
    owner = client.V1OwnerReference(api_version="batch/v1", kind="Job", name=name, uid=job.metadata.uid,
                                    controller=False, block_owner_deletion=False)
    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=client.V1ObjectMeta(name=service_name(name), namespace=namespace, labels=labels,
                                     annotations={ANNOTATION_JOB_ID: spec.job_id, ANNOTATION_ATTEMPT: str(spec.attempt)},
                                     owner_references=[owner]),
        spec=client.V1ServiceSpec(
            cluster_ip="None",
            selector=dict(labels),
            publish_not_ready_addresses=True,
            ports=[client.V1ServicePort(name="rendezvous", port=DEFAULT_MASTER_PORT, target_port=DEFAULT_MASTER_PORT,
                                        protocol="TCP")],
        ),
    )
