"""`jobservice run` supervises its processes: real processes, real signals, the real scheduler and worker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from app.db import Database
from tests.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
JOBSERVICE = str(Path(sys.executable).parent / "jobservice")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited already
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class Run:
    """`jobservice run ...` in a session of its own, its output in a file."""

    def __init__(self, env: dict[str, str], data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / f"run-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [JOBSERVICE, "run", *args], env=env, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.data_dir / "run.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def pid_of(self, name: str) -> int | None:
        entry = self.state().get("groups", {}).get(name)
        return entry["pid"] if entry and alive(entry["pid"]) else None

    def wait_started(self, *names: str, timeout: float = 60) -> dict[str, int]:
        def started() -> dict[str, int] | None:
            assert self.process.poll() is None, self.output
            pids = {name: self.pid_of(name) for name in names}
            return pids if all(pids.values()) else None  # type: ignore[return-value]

        return wait_for(started, timeout, message=f"{names} started:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self.log_file.close()


@pytest.fixture
def run_env(service_env: dict[str, str], database: Database, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ, **service_env,
        "JOBSERVICE_DATA_DIR": str(tmp_path / "data"), "HEARTBEAT_DIR": str(tmp_path / "beats"),
        "LOG_LEVEL": "INFO", "RESTART_BACKOFF_SECONDS": "0.2", "RESTART_BACKOFF_MAX_SECONDS": "5",
        "STOP_GRACE_SECONDS": "5", "SCHEDULER_INTERVAL_SECONDS": "0.5",
    }


@pytest.fixture
def runs(run_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """runs(*args, **env) -> Run; whatever is left is killed, group by group, at the end."""
    started: list[Run] = []

    def start(*args: str, **env: str) -> Run:
        run = Run({**run_env, **env}, tmp_path / "data", *args)
        started.append(run)
        return run

    (tmp_path / "data").mkdir()
    yield start
    for run in started:
        groups = [g["pid"] for g in run.state().get("groups", {}).values()]
        if run.process.poll() is None:
            run.stop(signal.SIGKILL)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def procfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "Procfile"
    path.write_text(text)
    return str(path)


def test_a_killed_scheduler_is_restarted_with_a_message_and_sigterm_stops_all(runs: Any, tmp_path: Path) -> None:
    run = runs("scheduler")
    first = run.wait_started("scheduler")["scheduler"]
    beat = tmp_path / "beats" / "scheduler"
    wait_for(beat.exists, 30, message="the scheduler's heartbeat file")

    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: (pid := run.pid_of("scheduler")) != first and pid, 30, message=f"a new scheduler:\n{run.output}")
    assert alive(second) and not alive(first)
    assert f"scheduler (pid {first}) was killed by SIGKILL" in run.output
    assert "restarting it in 0.2 s" in run.output
    touched = beat.stat().st_mtime
    wait_for(lambda: beat.stat().st_mtime > touched, 30, message="the new scheduler's heartbeat")

    assert run.stop(signal.SIGTERM) == 0
    assert not alive(second)
    assert f"scheduler (pid {second}) exited with code 0" in run.output
    assert not (run.data_dir / "run.json").exists()


def test_a_failing_process_backs_off_and_never_stops_the_others(runs: Any, tmp_path: Path) -> None:
    run = runs("--procfile", procfile(tmp_path, "steady: sleep 1000\nbroken: sh -c 'exit 3'\n"))
    steady = run.wait_started("steady")["steady"]
    wait_for(lambda: "restarting it in 0.8 s" in run.output, 30, message=f"the third restart:\n{run.output}")
    lines = [line for line in run.output.splitlines() if "broken (pid" in line and "exited with code 3" in line]
    assert [line.rsplit("restarting it in ", 1)[1] for line in lines[:3]] == ["0.2 s", "0.4 s", "0.8 s"]
    assert run.pid_of("steady") == steady
    assert run.stop() == 0
    assert not alive(steady)


def test_sigterm_first_then_sigkill_after_the_grace(runs: Any, tmp_path: Path) -> None:
    said_bye = tmp_path / "bye"
    run = runs(
        "--procfile",
        procfile(tmp_path, (
            f"polite: sh -c 'trap \"echo bye > {said_bye}; exit 0\" TERM; while true; do sleep 0.1; done'\n"
            "stubborn: sh -c 'trap \"\" TERM; while true; do sleep 0.1; done'\n"
        )),
        STOP_GRACE_SECONDS="1",
    )
    pids = run.wait_started("polite", "stubborn")
    assert run.stop() == 0
    assert said_bye.read_text().strip() == "bye"  # SIGTERM came first, and was waited for
    assert f"stubborn (pid {pids['stubborn']}) still running after the grace: SIGKILL" in run.output
    assert not any(alive(pid) for pid in pids.values())


def test_a_sigkilled_run_leaves_no_orphan_and_the_next_run_takes_the_port(runs: Any, tmp_path: Path) -> None:
    # `web` holds its port in a grandchild, as gunicorn's workers do: the death signal reaches only the
    # direct child, so the grandchild outlives the run; the next run must stop it before starting.
    port = free_port()
    path = procfile(tmp_path, f"web: sh -c '{sys.executable} -m http.server {port} --bind 127.0.0.1 & exec sleep 1000'\n")
    first = runs("--procfile", path)
    leader = first.wait_started("web")["web"]
    wait_for(lambda: served(port), 30, message="the first server")
    server = next(int(p) for p in Path(f"/proc/{leader}/task/{leader}/children").read_text().split())

    first.stop(signal.SIGKILL)
    wait_for(lambda: not alive(leader), 10, message="the supervised process to die with its supervisor")
    assert alive(server) and port_taken(port)  # the orphan that blocked the next run before

    second = runs("--procfile", path)
    second.wait_started("web")
    wait_for(lambda: not alive(server), 30, message="the orphan to be stopped")
    wait_for(lambda: served(port), 30, message=f"the second run's server:\n{second.output}")
    assert "stopped 1 processes left behind by a previous run" in second.output
    assert second.stop() == 0


def test_a_second_run_refuses_while_the_first_lives(runs: Any, tmp_path: Path) -> None:
    path = procfile(tmp_path, "idle: sleep 1000\n")
    first = runs("--procfile", path)
    idle = first.wait_started("idle")["idle"]
    second = runs("--procfile", path)
    assert second.process.wait(60) == 1
    assert "already running" in second.output
    assert alive(idle)
    assert first.stop() == 0


def port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def served(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
    except requests.RequestException:
        return False


# --- the probes' command -----------------------------------------------------------------------


def probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JOBSERVICE, "probe", *args], env=env, capture_output=True, text=True, timeout=60)


def test_probe_passes_on_a_fresh_heartbeat_and_fails_on_a_stale_or_missing_one(tmp_path: Path) -> None:
    env = {**os.environ, "HEARTBEAT_DIR": str(tmp_path)}
    missing = probe(env, "scheduler", "--max-age", "30")
    assert missing.returncode == 1 and "no heartbeat file" in missing.stderr
    beat = tmp_path / "scheduler"
    beat.touch()
    assert probe(env, "scheduler", "--max-age", "30").returncode == 0
    old = time.time() - 120
    os.utime(beat, (old, old))
    stale = probe(env, "scheduler", "--max-age", "30")
    assert stale.returncode == 1 and "(more than 30 s)" in stale.stderr
    assert probe(env, "scheduler", "--max-age", "0").returncode == 2  # bounded: argparse refuses


def test_a_worker_beats_for_its_own_node(start_worker: Any, tmp_path: Path) -> None:
    beats = tmp_path / "beats"
    start_worker("node-beat", HEARTBEAT_DIR=str(beats))
    wait_for((beats / "worker-node-beat").exists, 30, message="the worker's heartbeat file")
    env = {**os.environ, "HEARTBEAT_DIR": str(beats)}
    assert probe({**env, "WORKER_NODE": "node-beat"}, "worker", "--max-age", "30").returncode == 0
    assert probe({**env, "WORKER_NODE": "another-node"}, "worker", "--max-age", "30").returncode == 1
