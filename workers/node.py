"""The worker host as a node of the `local` cluster: registered at start, kept alive by heartbeats."""
from __future__ import annotations

import logging
import threading

from app.db import Database
from app.domain import execution
from app.domain.capacity import LOCAL_CLUSTER
from app.domain.quantities import cpu_to_millis, memory_to_bytes
from config import Settings
from workers.gpus import host_resources

log = logging.getLogger("jobservice.worker")


class NodeMembership:
    def __init__(self, settings: Settings, slots: int) -> None:
        self.settings = settings
        self.slots = slots
        self.database = Database(settings.database_url or "", pool_size=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="node-heartbeat", daemon=True)

    def start(self) -> None:
        self._register()
        self._thread.start()

    def _register(self) -> None:
        s = self.settings
        resources = host_resources(
            gpus=s.worker_gpus,
            gpu_count=s.worker_gpu_count,
            gpu_type=s.worker_gpu_type,
            cpu_millis=cpu_to_millis(s.worker_cpu) if s.worker_cpu else None,
            memory_bytes=memory_to_bytes(s.worker_memory) if s.worker_memory else None,
            nvidia_smi=s.nvidia_smi,
        )
        with self.database.session() as session:
            execution.register_node(
                session, cluster=LOCAL_CLUSTER, name=s.worker_node, gpu_indices=resources.gpu_indices,
                gpu_type=resources.gpu_type, cpu_millis=resources.cpu_millis, memory_bytes=resources.memory_bytes,
                slots=self.slots,
            )
        log.info(
            "node %s registered: GPUs %s, %d millicores, %d bytes, %d slots",
            s.worker_node, resources.gpu_indices, resources.cpu_millis, resources.memory_bytes, self.slots,
        )

    def _beat(self) -> None:
        interval = max(1.0, self.settings.node_lease_seconds / 3)
        while not self._stop.wait(interval):
            try:
                with self.database.session() as session:
                    known = execution.node_heartbeat(session, LOCAL_CLUSTER, self.settings.worker_node)
                if not known:  # the row was removed (an operator, a reset): join again
                    self._register()
            except Exception:  # noqa: BLE001 - try again next beat
                log.exception("node heartbeat failed")

    def stop(self) -> None:
        self._stop.set()
        with self.database.session() as session:
            execution.deregister_node(session, LOCAL_CLUSTER, self.settings.worker_node)
        self.database.dispose()
