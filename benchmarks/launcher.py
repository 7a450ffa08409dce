"""What starting a member through each build of the member launcher costs (workers/executors/launcher.c).

Builds the launcher each way this host's compiler allows (launcher.BUILDS: without the C library, static, plain),
then starts `/bin/true` through each, one after another as the worker starts members (vfork and exec, from this
process), and prints the CPU of the started processes and the wall time per start. `/bin/true` started directly
is the floor: what the job's own program costs.

    python benchmarks/launcher.py --starts 1000 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.executors import launcher  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_starts(prefix: list[str], program: str, starts: int) -> tuple[float, float]:
    """CPU of the started processes and wall time, ms per start."""
    cpu, began = children_cpu(), time.perf_counter()
    for _ in range(starts):
        subprocess.run([*prefix, program], check=True)
    return (children_cpu() - cpu) * 1000 / starts, (time.perf_counter() - began) * 1000 / starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="the ways take turns, this many times")
    parser.add_argument("--program", default="/bin/true")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="jobservice-launchers-"))
    ways: dict[str, list[str]] = {"direct (no launcher)": []}
    for name in launcher.BUILDS:
        built = launcher.build(folder / name / "jobservice-launch", [name])
        if built is None:
            print(f"{name}: not possible on this host")
            continue
        ways[name] = [built, str(os.getpid()), "-"]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, prefix in ways.items():
            results[name].append(time_starts(prefix, args.program, args.starts))
    print(f"{args.starts} starts of {args.program} per round, {args.rounds} rounds, load {os.getloadavg()[0]:.2f}:")
    for name, figures in results.items():
        cpu = statistics.median(c for c, _ in figures)
        wall = statistics.median(w for _, w in figures)
        print(f"  {name:22} CPU {cpu:6.3f} ms per start (median of rounds)   wall {wall:6.3f} ms")


if __name__ == "__main__":
    main()
