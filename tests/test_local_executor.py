"""The local executor with real processes: containment of what a job starts, interruptible gang launches,
bounded log lines. Run under each containment the host offers (a cgroup v2 per attempt where it is
writable, else process tree + subreaper + environment marker)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.executors import containment
from workers.executors.base import EndKind, JobSpec, LogLine, Outcome
from workers.executors.launcher import launcher
from workers.executors.local import PIECE_BYTES, LocalExecution, LocalExecutor

CGROUP = containment.prepare_jobs_cgroup("auto", delegate=True)  # as a worker does before its pool starts
MODES = ["off"] + (["auto"] if CGROUP is not None else [])
# How members are started: through the member launcher (built here as a worker builds it) or through sh and setpriv.
BUILT_LAUNCHER = launcher("auto", Path(tempfile.gettempdir()) / "jobservice-test-launcher")
STARTS = ["setpriv"] + (["launcher"] if BUILT_LAUNCHER is not None else [])


def launcher_for(start: str) -> str | None:
    return BUILT_LAUNCHER if start == "launcher" else None


def alive(pid: int) -> bool:
    info = containment.read_process(pid)
    return info is not None and info.state != "Z"


def spec(command: list[str], members: int = 1, timeout: int | None = None, job_id: str = "job-exec-test", **extra: object) -> JobSpec:
    return JobSpec(
        job_id=job_id, attempt=0, image=None, command=command, env={}, config={}, cpu_millis=100,
        memory_bytes=256 * 2**20, gpus=0, members=members, timeout_seconds=timeout, cluster="local", node="n",
        **extra,  # type: ignore[arg-type]
    )


def run_until_end(execution: LocalExecution, limit: float = 30) -> Outcome:
    deadline = time.monotonic() + limit
    while (outcome := execution.poll()) is None:
        assert time.monotonic() < deadline, "the execution did not end"
        time.sleep(0.02)
    return outcome


def wait_pids(path: Path, count: int, limit: float = 10) -> list[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        pids = [int(p) for p in path.read_text().split()] if path.exists() else []
        if len(pids) >= count:
            return pids
        time.sleep(0.02)
    raise AssertionError(f"{path} holds fewer than {count} pids")


@pytest.fixture(params=[(mode, start) for mode in MODES for start in STARTS], ids="-".join)
def executor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalExecutor]:
    mode, start = request.param
    yield LocalExecutor(tmp_path / "work", kill_grace_seconds=1, cgroup=mode, launcher=launcher_for(start))


# setsid: a new session; ( ... & ): a double fork whose parent exits at once; env -i: no marker either.
ESCAPES = 'setsid sleep 231 & echo $! >> {pids}; (sleep 232 & echo $! >> {pids}); (env -i setsid sleep 233 & echo $! >> {pids}); '


@pytest.mark.parametrize("stop", ["cancel", "timeout", "exit"])
def test_every_process_a_job_started_is_gone_when_its_end_is_reported(executor: LocalExecutor, tmp_path: Path, stop: str) -> None:
    pids = tmp_path / "pids"
    tail = "exit 0" if stop == "exit" else "sleep 100"
    lines: list[LogLine] = []
    execution = executor.launch(spec(["sh", "-c", ESCAPES.format(pids=pids) + tail], timeout=1 if stop == "timeout" else None), lines.extend)
    assert isinstance(execution, LocalExecution)
    first = execution.poll()  # starts the member; one that exits at once may end in this very poll
    assert first is None or stop == "exit"
    started = wait_pids(pids, 3)
    if stop == "cancel":
        assert all(alive(p) for p in started)
        execution.cancel()
    outcome = run_until_end(execution)
    # Nothing it started may live once its end is known: its GPUs go to the next job then.
    assert [p for p in started if alive(p)] == []
    # Re-parented to this process (a subreaper), they are collected, not left as zombies.
    assert [p for p in started if (info := containment.read_process(p)) and info.ppid == os.getpid()] == []
    expected = {"cancel": EndKind.CANCELLED, "timeout": EndKind.TIMEOUT, "exit": EndKind.EXITED}[stop]
    assert outcome.kind == expected
    if executor.jobs_cgroup is not None:
        assert not list(executor.jobs_cgroup.glob("job-exec-test.*")), "the attempt's cgroup is removed"


def test_a_gang_launch_is_interrupted_by_cancel_and_leaves_no_member(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1, cgroup="auto", launch_slice_seconds=0)
    pids = tmp_path / "pids"
    execution = executor.launch(spec(["sh", "-c", f"echo $$ >> {pids}; exec sleep 30"], members=50), lambda lines: None)
    assert isinstance(execution, LocalExecution)
    for _ in range(5):
        assert execution.poll() is None
    assert 0 < execution.launched < 50  # one member per poll here: the launch is in progress
    execution.cancel()
    launched = execution.launched
    outcome = run_until_end(execution)
    assert outcome.kind == EndKind.CANCELLED and execution.launched == launched, "no member starts after the cancel"
    started = [int(p) for p in pids.read_text().split()] if pids.exists() else []
    assert len(started) <= launched and [p for p in started if alive(p)] == []


def test_a_timeout_stops_a_gang_launch_too(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1, cgroup="auto", launch_slice_seconds=0)
    execution = executor.launch(spec(["sleep", "30"], members=10_000, timeout=1), lambda lines: None)
    assert isinstance(execution, LocalExecution)
    outcome = run_until_end(execution, limit=60)
    assert outcome.kind == EndKind.TIMEOUT and execution.launched < 10_000
    assert all(p.poll() is not None for p in execution.processes)


def test_a_whole_gang_starts_when_not_interrupted(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1)
    lines: list[LogLine] = []
    execution = executor.launch(spec(["sh", "-c", "echo rank=$JOB_RANK"], members=20), lines.extend)
    assert run_until_end(execution).kind == EndKind.EXITED
    assert sorted(line.line for line in lines) == sorted(f"rank={r}" for r in range(20))


def test_a_member_that_cannot_start_fails_the_launch_and_stops_the_others(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=5)
    execution = executor.launch(spec(["/nonexistent/program"], members=3), lambda lines: None)
    outcome = run_until_end(execution, limit=5)
    assert outcome.kind == EndKind.LAUNCH_FAILED and "could not start" in outcome.reason


def test_a_line_without_end_reaches_the_sink_in_bounded_pieces(executor: LocalExecutor) -> None:
    lines: list[LogLine] = []
    size = 3 * PIECE_BYTES + 10
    execution = executor.launch(spec(["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' a; echo; echo next"]), lines.extend)
    assert run_until_end(execution).kind == EndKind.EXITED
    assert max(len(line.line) for line in lines) <= PIECE_BYTES
    assert sum(len(line.line) for line in lines if line.line != "next") == size and lines[-1].line == "next"


def test_the_job_environment_carries_the_attempt_marker(executor: LocalExecutor) -> None:
    lines: list[LogLine] = []
    execution = executor.launch(spec(["sh", "-c", f"echo ${containment.MARKER}"], job_id="job-marker"), lines.extend)
    assert run_until_end(execution).kind == EndKind.EXITED
    assert lines[0].line.startswith("job-marker:0:")


WORKER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from workers.executors.local import LocalExecutor
    from tests.test_local_executor import spec
    executor = LocalExecutor(sys.argv[1], kill_grace_seconds=1, cgroup=sys.argv[2], launcher=sys.argv[4] or None)
    execution = executor.launch(spec(["sh", "-c", sys.argv[3]], job_id="job-orphaned"), lambda lines: None)
    while True:
        execution.poll()
        time.sleep(0.05)
    """
)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_sweep_kills_what_a_dead_worker_left_running(tmp_path: Path, mode: str, start: str) -> None:
    pids = tmp_path / "pids"
    script = f"setsid sleep 231 & echo $! >> {pids}; (sleep 232 & echo $! >> {pids}); sleep 100"
    root = Path(__file__).resolve().parent.parent
    worker = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path / "work"), mode, script, launcher_for(start) or ""], cwd=root)
    try:
        started = wait_pids(pids, 2)
        os.kill(worker.pid, signal.SIGKILL)  # no cleanup of any kind: PDEATHSIG takes the member, not its escapees
        worker.wait()
        time.sleep(0.2)
        assert all(alive(p) for p in started)
        # Any sweep on this host may be the one that kills them (another worker's heartbeat sweeps too).
        containment.sweep(containment.find_jobs_cgroup(mode))
        deadline = time.monotonic() + 5
        while any(alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [p for p in started if alive(p)] == []
    finally:
        worker.kill()


def test_a_sweep_leaves_the_processes_of_a_live_worker_alone(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1)
    pids = tmp_path / "pids"
    execution = executor.launch(spec(["sh", "-c", f"setsid sleep 60 & echo $! >> {pids}; sleep 60"]), lambda lines: None)
    execution.poll()
    started = wait_pids(pids, 1)
    containment.sweep(executor.jobs_cgroup)
    assert alive(started[0])
    execution.cancel()
    run_until_end(execution)
    assert not alive(started[0])


def test_requests_become_cgroup_limits_where_the_controllers_are_delegated(tmp_path: Path) -> None:
    assert containment.cpu_max(500) == "50000 100000"
    assert containment.cpu_max(1) == "1000 100000"  # the kernel's smallest quota
    if CGROUP is None or "memory" not in (CGROUP / "cgroup.subtree_control").read_text().split():
        pytest.skip("this host delegates no memory controller to cgroup v2 (hybrid hierarchy): limits are not enforced here")
    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1)
    execution = executor.launch(spec(["sleep", "30"], job_id="job-limits"), lambda lines: None)
    execution.poll()
    try:
        leaf = next(CGROUP.glob("job-limits.0.*")) / "m0"
        assert (leaf / "memory.max").read_text().strip() == str(256 * 2**20)
        if (leaf / "cpu.max").exists():
            assert (leaf / "cpu.max").read_text().strip() == "10000 100000"
    finally:
        execution.cancel()
        run_until_end(execution)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_member_dies_with_its_worker(tmp_path: Path, mode: str, start: str) -> None:
    """PR_SET_PDEATHSIG, whether set by the launcher or by `setpriv` (both vfork)."""
    pids = tmp_path / "pids"
    root = Path(__file__).resolve().parent.parent
    worker = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path / "work"), mode, f"echo $$ >> {pids}; exec sleep 233",
                               launcher_for(start) or ""], cwd=root)
    try:
        member = wait_pids(pids, 1)[0]
        assert alive(member)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 5
        while alive(member) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(member), "the member outlived its worker"
    finally:
        worker.kill()
        containment.sweep(containment.find_jobs_cgroup(mode))


def test_without_a_cgroup_members_start_with_vfork_through_setpriv(tmp_path: Path) -> None:
    if not containment.pdeathsig_prefix():
        pytest.skip("no setpriv with --pdeathsig on this host: members start with a preexec_fn")
    contained = containment.Containment("job-vfork", 0, None)
    start = contained.member_setup(0, 100, 2**20)
    start.close()
    containment.unregister_execution([])
    assert start.preexec is None  # no preexec_fn: Popen may use vfork
    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1, cgroup="off")
    lines: list[LogLine] = []
    execution = executor.launch(spec(["sh", "-c", "grep -h '^PPid' /proc/self/status; echo ok"]), lines.extend)
    assert run_until_end(execution).kind == EndKind.EXITED
    assert "ok" in [line.line for line in lines]


def test_with_a_cgroup_members_join_their_leaf_themselves_and_start_with_vfork(tmp_path: Path) -> None:
    if CGROUP is None or not containment.pdeathsig_prefix():
        pytest.skip("no writable cgroup v2, or no setpriv with --pdeathsig, on this host")
    contained = containment.Containment("job-vfork-cgroup", 0, CGROUP)
    start = contained.member_setup(0, 100, 2**20)
    start.close()
    assert start.preexec is None and start.prefix[-len(containment.pdeathsig_prefix()):] == containment.pdeathsig_prefix()
    assert contained.cgroup is not None
    containment.sweep(CGROUP)
    containment.unregister_execution([])

    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1, cgroup="auto")
    lines: list[LogLine] = []
    execution = executor.launch(spec(["sh", "-c", "cat /proc/self/cgroup; sleep 0.2; echo ok"], job_id="job-vfork-cgroup"), lines.extend)
    assert run_until_end(execution).kind == EndKind.EXITED
    texts = [line.line for line in lines]
    assert "ok" in texts, texts
    unified = [t for t in texts if t.startswith("0::")]
    assert unified and unified[0].endswith("/m0") and "job-vfork-cgroup.0." in unified[0], texts


def test_a_member_that_cannot_join_its_cgroup_never_runs(tmp_path: Path) -> None:
    if not containment.pdeathsig_prefix():
        pytest.skip("no setpriv with --pdeathsig on this host")
    marker = tmp_path / "ran"
    missing = tmp_path / "no-such-cgroup" / "cgroup.procs"
    run = subprocess.run([containment._SHELL, "-c", containment._JOIN_CGROUP, str(missing), *containment.pdeathsig_prefix(),
                          "touch", str(marker)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 125 and "cannot join the attempt's cgroup" in run.stderr
    assert not marker.exists()


def test_with_a_cgroup_a_member_started_through_the_launcher_is_in_its_leaf_from_its_first_instruction(tmp_path: Path) -> None:
    if CGROUP is None or BUILT_LAUNCHER is None:
        pytest.skip("no writable cgroup v2, or no C compiler to build the launcher, on this host")
    contained = containment.Containment("job-launched", 0, CGROUP, BUILT_LAUNCHER)
    start = contained.member_setup(0, 100, 2**20)
    start.close()
    assert contained.cgroup is not None
    assert start.preexec is None and start.prefix == [BUILT_LAUNCHER, str(os.getpid()), str(contained.cgroup / "m0" / "cgroup.procs")]
    containment.sweep(CGROUP)
    containment.unregister_execution([])

    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1, cgroup="auto", launcher=BUILT_LAUNCHER)
    lines: list[LogLine] = []
    execution = executor.launch(spec(["cat", "/proc/self/cgroup"], job_id="job-launched"), lines.extend)
    assert run_until_end(execution).kind == EndKind.EXITED
    unified = [line.line for line in lines if line.line.startswith("0::")]
    assert unified and unified[0].endswith("/m0") and "job-launched.0." in unified[0], lines


def test_job_workdir_is_the_member_s_working_folder_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    executor = LocalExecutor(Path("link") / "work", kill_grace_seconds=1, cgroup="off")  # relative, through a symlink
    lines: list[LogLine] = []
    execution = executor.launch(spec(["sh", "-c", 'echo "$JOB_WORKDIR"; pwd -P'], job_id="job-workdir"), lines.extend)
    assert run_until_end(execution).kind == EndKind.EXITED
    expected = str((tmp_path / "real" / "work" / "job-workdir" / "attempt-0").resolve())
    assert [line.line for line in lines] == [expected, expected]


def test_an_attempt_s_cgroup_is_removed_even_with_cgroups_its_member_made_inside_its_leaf(tmp_path: Path) -> None:
    """The end removes the leaves it made and the attempt's cgroup; a member that made cgroups of its own (it runs as
    the worker's user, who may) has the whole tree removed, deepest first."""
    if CGROUP is None:
        pytest.skip("no writable cgroup v2 on this host")
    executor = LocalExecutor(tmp_path / "work", kill_grace_seconds=1, cgroup="auto", launcher=BUILT_LAUNCHER)
    mount = containment._cgroup2_mount()
    script = f'd={mount}$(sed -n "s/^0:://p" /proc/self/cgroup); mkdir -p "$d/own/deeper" && echo made'
    lines: list[LogLine] = []
    execution = executor.launch(spec(["sh", "-c", script], job_id="job-own-cgroups"), lines.extend)
    assert run_until_end(execution).kind == EndKind.EXITED
    assert [line.line for line in lines] == ["made"], lines
    assert not list(CGROUP.glob("job-own-cgroups.*")), "the attempt's cgroup, with what its member made, is removed"


def test_the_program_is_found_as_exec_would_find_it(tmp_path: Path) -> None:
    from workers.executors.local import _resolve

    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("data")
    assert _resolve("tool", f"/nonexistent:{tmp_path}", tmp_path) == str(script)
    assert _resolve("./tool", None, tmp_path) == str(tmp_path / "./tool")
    assert _resolve(str(script), None, Path("/")) == str(script)
    with pytest.raises(FileNotFoundError):
        _resolve("no-such-program-here", str(tmp_path), tmp_path)
    with pytest.raises(FileNotFoundError):
        _resolve("/nonexistent/program", None, tmp_path)
    with pytest.raises(PermissionError):
        _resolve("plain", str(tmp_path), tmp_path)
    with pytest.raises(PermissionError):
        _resolve(str(tmp_path), None, tmp_path)  # a folder


def test_a_cgroup_name_lands_beside_the_workers_own_cgroup_and_a_relative_path_is_refused() -> None:
    from config import parse_cgroup

    assert [parse_cgroup(v) for v in ("", " auto ", "off", "jobs-ci.1", "/sys/fs/cgroup/x")] == ["auto", "auto", "off", "jobs-ci.1", "/sys/fs/cgroup/x"]
    for bad in ("jobs/ci", "./jobs", "../jobs", ".hidden", "/sys/fs/cgroup/../x", "/a\0b", "x" * 65):
        with pytest.raises(ValueError, match="WORKER_CGROUP"):
            parse_cgroup(bad)
    auto = containment.find_jobs_cgroup("auto")
    named = containment.find_jobs_cgroup("jobs-ci.1")
    if auto is None:  # no cgroup v2 here: a name finds nothing either, rather than a plain folder in the cwd
        assert named is None
    else:
        assert named == auto.parent / "jobs-ci.1"
    assert containment.find_jobs_cgroup("/sys/fs/cgroup/x") == Path("/sys/fs/cgroup/x")
    assert containment.find_jobs_cgroup("off") is None


def watch(execution: LocalExecution, limit: float = 30) -> tuple[Outcome, int]:
    """As the worker's watch loop drives it (poll, then wait on the members' exits): the outcome, and the most
    threads this process ran meanwhile beyond those it had before."""
    before = threading.active_count()
    most = 0
    deadline = time.monotonic() + limit
    while (outcome := execution.poll()) is None:
        assert time.monotonic() < deadline, "the execution did not end"
        most = max(most, threading.active_count() - before)
        execution.wait(0.05)
    return outcome, most


def test_a_job_that_prints_nothing_costs_no_log_reader_thread_and_output_after_a_quiet_spell_is_kept_whole(
    executor: LocalExecutor,
) -> None:
    lines: list[LogLine] = []
    quiet = executor.launch(spec(["sleep", "0.5"], job_id="job-quiet"), lines.extend)
    outcome, extra_threads = watch(quiet)
    assert outcome.kind == EndKind.EXITED and outcome.exit_code == 0
    assert extra_threads == 0 and lines == []
    # Output that comes later, more than a pipe holds, with no line end, then on the other stream: all of it kept.
    size = 3 * PIECE_BYTES + 10
    noisy = executor.launch(spec(["sh", "-c", f"sleep 0.3; head -c {size} /dev/zero | tr '\\0' a; echo; echo last >&2"],
                                 job_id="job-late-output"), lines.extend)
    assert watch(noisy)[0].kind == EndKind.EXITED
    assert sum(len(line.line) for line in lines if line.stream == "stdout") == size
    assert [line.line for line in lines if line.stream == "stderr"] == ["last"]
