"""What a worker host offers: GPUs (nvidia-smi, or configured), CPU and memory."""
from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostResources:
    gpu_indices: list[int]
    gpu_type: str | None
    cpu_millis: int
    memory_bytes: int


def parse_nvidia_smi_query(output: str) -> tuple[list[int], str | None]:
    """Parse `nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits`."""
    indices: list[int] = []
    names: set[str] = set()
    for row in csv.reader(io.StringIO(output)):
        if len(row) < 3 or not row[0].strip().isdigit():
            continue
        indices.append(int(row[0].strip()))
        names.add(row[2].strip())
    gpu_type = " / ".join(sorted(names)) if names else None
    return indices, gpu_type


def discover_gpus(nvidia_smi: str) -> tuple[list[int], str | None]:
    try:
        completed = subprocess.run(
            [nvidia_smi, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("no GPUs discovered (%s): running CPU-only", exc)
        return [], None
    return parse_nvidia_smi_query(completed.stdout)


def total_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def host_resources(
    *,
    gpus: tuple[int, ...] | None,
    gpu_count: int | None,
    gpu_type: str | None,
    cpu_millis: int | None,
    memory_bytes: int | None,
    nvidia_smi: str,
) -> HostResources:
    """Configured values win; otherwise what the host reports."""
    if gpus is not None:
        indices, found_type = list(gpus), None
    elif gpu_count is not None:
        indices, found_type = list(range(gpu_count)), None
    else:
        indices, found_type = discover_gpus(nvidia_smi)
    return HostResources(
        gpu_indices=indices,
        gpu_type=gpu_type or found_type,
        cpu_millis=cpu_millis if cpu_millis is not None else (os.cpu_count() or 1) * 1000,
        memory_bytes=memory_bytes if memory_bytes is not None else total_memory_bytes(),
    )
