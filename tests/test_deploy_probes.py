"""deploy/kubernetes gives every process probes that work: the exec probes run for real against heartbeat
files, and their limits leave room for the heartbeat intervals the defaults give."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from config import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
JOBSERVICE = str(Path(sys.executable).parent / "jobservice")


def containers() -> dict[str, dict[str, Any]]:
    found = {}
    for doc in yaml.safe_load_all((DEPLOY / "processes.yaml").read_text()):
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            for container in spec["containers"]:
                found[doc["metadata"]["name"]] = {**container, "_volumes": spec.get("volumes", [])}
    return found


def config_map() -> dict[str, str]:
    return next(d for d in yaml.safe_load_all((DEPLOY / "config.yaml").read_text()) if d["kind"] == "ConfigMap")["data"]


def test_every_process_has_liveness_and_readiness_probes() -> None:
    found = containers()
    assert set(found) == {"jobservice-api", "jobservice-scheduler", "jobservice-worker", "jobservice-flower"}
    for name, container in found.items():
        assert "livenessProbe" in container and "readinessProbe" in container, name
    api = found["jobservice-api"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert found["jobservice-flower"]["livenessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_exec_probes_pass_on_a_fresh_heartbeat_and_fail_on_a_stale_one(tmp_path: Path) -> None:
    heartbeat_dir = config_map()["HEARTBEAT_DIR"]
    defaults = Settings.from_env({})
    intervals = {
        "scheduler": defaults.scheduler_interval_seconds,
        "worker": max(defaults.inventory_sync_seconds, defaults.node_lease_seconds / 3),
    }
    checked = 0
    for name, container in containers().items():
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container.get(kind, {}).get("exec", {}).get("command")
            if not command:
                continue
            assert heartbeat_dir in mounts.values(), f"{name}: the heartbeat folder must be a mounted volume"
            assert any(v.get("emptyDir") is not None for v in container["_volumes"]), name
            process, max_age = command[2], float(command[command.index("--max-age") + 1])
            # Two beats may be missed (a slow tick, a database blip) before a probe fails.
            assert max_age >= 3 * intervals[process], f"{name} {kind}: --max-age {max_age} vs beats every {intervals[process]} s"
            env = {**os.environ, "HEARTBEAT_DIR": str(tmp_path), "WORKER_NODE": "pod-1"}
            beat = tmp_path / ("scheduler" if process == "scheduler" else "worker-pod-1")
            beat.touch()
            assert subprocess.run([JOBSERVICE, *command[1:]], env=env, timeout=60).returncode == 0, f"{name} {kind}"
            stale = time.time() - max_age - 5
            os.utime(beat, (stale, stale))
            assert subprocess.run([JOBSERVICE, *command[1:]], env=env, timeout=60, stderr=subprocess.DEVNULL).returncode == 1
            beat.unlink()
            checked += 1
    assert checked == 6
