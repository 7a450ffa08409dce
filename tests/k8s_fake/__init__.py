"""A small fake Kubernetes API server for the Kubernetes executor's tests (see server.py)."""
from tests.k8s_fake.server import FakeKubernetes, FakeNode, Script

__all__ = ["FakeKubernetes", "FakeNode", "Script"]
