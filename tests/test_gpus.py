"""GPU discovery on a worker host, against real nvidia-smi output captured on an H200 host."""
from __future__ import annotations

import stat
from pathlib import Path

from workers.gpus import discover_gpus, host_resources, parse_nvidia_smi_query

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi-h200"


def fake_nvidia_smi(tmp_path: Path, output: str, exit_code: int = 0) -> str:
    """An executable that answers like nvidia-smi: the discovery really runs a process."""
    (tmp_path / "out.txt").write_text(output)
    script = tmp_path / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat {tmp_path}/out.txt\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_parses_the_h200_query_output() -> None:
    indices, gpu_type = parse_nvidia_smi_query((FIXTURES / "nvidia-smi-query-noheader.csv").read_text())
    assert indices == [0] and gpu_type == "NVIDIA H200"


def test_discovery_runs_nvidia_smi_with_the_query_it_parses(tmp_path: Path) -> None:
    binary = fake_nvidia_smi(tmp_path, (FIXTURES / "nvidia-smi-query-noheader.csv").read_text())
    assert discover_gpus(binary) == ([0], "NVIDIA H200")
    assert "--query-gpu=index,uuid,name,memory.total" in (tmp_path / "args").read_text()


def test_an_eight_gpu_host(tmp_path: Path) -> None:
    line = (FIXTURES / "nvidia-smi-query-noheader.csv").read_text().strip()
    output = "\n".join(line.replace("0,", f"{i},", 1) for i in range(8))
    assert discover_gpus(fake_nvidia_smi(tmp_path, output)) == (list(range(8)), "NVIDIA H200")


def test_no_driver_means_no_gpus(tmp_path: Path) -> None:
    assert discover_gpus(str(tmp_path / "missing-nvidia-smi")) == ([], None)
    assert discover_gpus(fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed\n", exit_code=9)) == ([], None)


def test_configuration_wins_over_discovery(tmp_path: Path) -> None:
    binary = fake_nvidia_smi(tmp_path, (FIXTURES / "nvidia-smi-query-noheader.csv").read_text())
    pinned = host_resources(gpus=(2, 3), gpu_count=None, gpu_type=None, cpu_millis=4000, memory_bytes=2**30, nvidia_smi=binary)
    assert (pinned.gpu_indices, pinned.cpu_millis, pinned.memory_bytes) == ([2, 3], 4000, 2**30)
    counted = host_resources(gpus=None, gpu_count=4, gpu_type="fake", cpu_millis=None, memory_bytes=None, nvidia_smi=binary)
    assert counted.gpu_indices == [0, 1, 2, 3] and counted.gpu_type == "fake" and counted.cpu_millis >= 1000
    discovered = host_resources(gpus=None, gpu_count=None, gpu_type=None, cpu_millis=None, memory_bytes=None, nvidia_smi=binary)
    assert discovered.gpu_indices == [0] and discovered.gpu_type == "NVIDIA H200" and discovered.memory_bytes > 0
