"""Compute clusters: the local worker hosts, and each configured Kubernetes cluster from its live API."""
from __future__ import annotations

import logging
from typing import Any

from flask import abort, current_app
from flask.views import MethodView

from app.api import Blueprint
from app.api.context import session, settings
from app.api.identity import current_caller
from app.domain import clusters
from app.domain.capacity import LOCAL_CLUSTER
from app.domain.jobs import utcnow
from app.domain.nodes import node_states
from app.kube import ClusterClients, read_inventory

log = logging.getLogger(__name__)
blp = Blueprint("clusters", __name__, url_prefix="/api/v1/clusters", description="Compute clusters")


def cluster_clients_of(app: Any) -> ClusterClients:
    return app.extensions["jobservice.clusters"]


def cluster_clients() -> ClusterClients:
    return cluster_clients_of(current_app)


def _view(name: str, running: dict[str, int]) -> clusters.ClusterView:
    if name == LOCAL_CLUSTER:
        return clusters.local_cluster(session(), utcnow(), settings().node_lease_seconds, running.get(name, 0))
    s = settings()
    try:
        inventory = read_inventory(cluster_clients().client(name), name, s.kubernetes_gpu_resource, s.kubernetes_gpu_product_label)
    except Exception:  # noqa: BLE001 - an unreachable cluster is reported, not raised
        log.warning("cluster %s unreachable", name, exc_info=True)
        inventory = None
    states = {node: state for (cluster, node), state in node_states(session()).items() if cluster == name}
    return clusters.kubernetes_cluster(name, inventory, running.get(name, 0), states)


@blp.route("/")
class ClusterCollection(MethodView):
    def get(self) -> dict[str, Any]:
        """List compute clusters"""
        current_caller()
        running = clusters.running_jobs_by_cluster(session())
        names = [LOCAL_CLUSTER, *cluster_clients().names]
        return {"clusters": [_view(name, running).summary() for name in names]}


@blp.route("/<string:cluster_name>")
class ClusterItem(MethodView):
    @blp.alt_response(404, description="Cluster not found")
    @blp.alt_response(503, description="Cluster API unreachable")
    def get(self, cluster_name: str) -> dict[str, Any]:
        """Nodes, GPUs, CPU and memory of a cluster, and the jobs it runs"""
        current_caller()
        if cluster_name != LOCAL_CLUSTER and cluster_name not in cluster_clients().names:
            abort(404, description=f"Cluster {cluster_name} not found")
        view = _view(cluster_name, clusters.running_jobs_by_cluster(session()))
        if not view.reachable:
            abort(503, description=f"The API server of cluster {cluster_name} cannot be reached")
        return view.detail()


def register(app: Any) -> None:
    s = app.config["JOBSERVICE_SETTINGS"]
    app.extensions["jobservice.clusters"] = ClusterClients(s.kubernetes_clusters, s.kubeconfig, s.kubernetes_qps, s.kubernetes_burst)
