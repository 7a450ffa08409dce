"""Liveness files: a loop that did its work touches its file; `jobservice probe` checks the file's age.

A process can be alive and useless (a scheduler whose ticks all fail, a worker that cannot reach the
database): only the loop's own progress tells. Kubernetes exec probes read the file's modification time.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from config import Settings

log = logging.getLogger("jobservice.heartbeat")


def path_for(settings: Settings, process: str) -> Path:
    """`scheduler`, or `worker`: one file per worker node, since several workers may share a host in development."""
    name = f"worker-{settings.worker_node}" if process == "worker" else process
    return Path(settings.heartbeat_dir) / name


def touch(path: Path) -> None:
    """Never raises: a heartbeat that cannot be written shows as a stale file, which is the truth."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # updates the modification time of an existing file
    except OSError as exc:
        log.warning("cannot write the heartbeat file %s: %s", path, exc)


def age_seconds(path: Path) -> float | None:
    """Seconds since the last touch, or None when there is no file."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None
