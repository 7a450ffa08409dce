"""The local executor: a job's command as processes on the worker's own host (bare GPU hosts, the embedded default).

Each member runs in its own session (process group) and dies with the worker (PR_SET_PDEATHSIG). What a
member starts is contained (workers/executors/containment.py: a cgroup per attempt where the host has
cgroup v2, a subreaper and an environment marker everywhere), so a timeout, a cancel or the end of the
job kills everything it started, and the end is reported only once all of it is gone. A gang's members
are started a few at a time from `poll()`, so a cancel or a timeout stops a launch in progress.
"""
from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import signal
import subprocess
import termios
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import IO

from workers.executors import containment
from workers.executors.base import EndKind, JobSpec, LogLine, LogSink, Outcome, free_port

# Variables a job inherits from the worker; everything else (database URLs, secrets) stays out.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LD_LIBRARY_PATH")
# A line longer than this reaches the log sink in pieces: a line with no newline must not fill the worker's memory.
PIECE_BYTES = 65_536
LAUNCH_SLICE_SECONDS = 0.05  # members started per poll: the watch loop sees a cancel between slices
REAP_EVERY_SECONDS = 2.0


class FinishedExecution:
    """An execution that ended before it began (nothing to run)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def poll(self) -> Outcome | None:
        return self.outcome

    def cancel(self, kind: EndKind = EndKind.CANCELLED, reason: str = "cancelled") -> None:
        pass


class LocalExecution:
    def __init__(
        self, spec: JobSpec, logs: LogSink, folder: Path, contained: containment.Containment,
        kill_grace_seconds: float, launch_slice_seconds: float = LAUNCH_SLICE_SECONDS,
    ) -> None:
        self.spec = spec
        self.logs = logs
        self.folder = folder
        self.contained = contained
        self.processes: list[subprocess.Popen[bytes]] = []
        self.readers: list[threading.Thread] = []
        self.kill_grace_seconds = kill_grace_seconds
        self.launch_slice_seconds = launch_slice_seconds
        self.started = time.monotonic()
        self._stop_outcome: Outcome | None = None
        self._term_sent_at: float | None = None
        self._reaped_at = self.started
        self._outcome: Outcome | None = None
        self._exit_fds: list[int] = []  # a pidfd per member (Linux 5.3+): readable once the member exited
        # Output pipes no reader thread reads yet: (pipe, stream, rank). A member watched through its pidfd gets
        # its readers once a pipe holds output; a member that printed nothing by its exit needs none: two
        # threads started and joined per job cost ~0.2 ms of CPU.
        self._unread: list[tuple[IO[bytes], str, int]] = []
        self._closed: set[IO[bytes]] = set()  # unread pipes at their end (readable forever): no longer waited on

    def poll(self) -> Outcome | None:
        if self._outcome is not None:
            return self._outcome
        if self._stop_outcome is None and len(self.processes) < self.spec.members:
            self._launch_some()
        if self._unread:
            self._check_pipes(0)
        codes = [p.poll() for p in self.processes]
        if self._stop_outcome is None:
            self._check_for_stop(codes)
        if self._stop_outcome is not None:
            if any(code is None for code in codes):
                self._signal_members()
                return None
            return self._finish(self._stop_outcome)
        if len(codes) == self.spec.members and all(code == 0 for code in codes):
            return self._finish(Outcome(EndKind.EXITED, "exit code 0", exit_code=0))
        if time.monotonic() - self._reaped_at >= REAP_EVERY_SECONDS:
            self._reaped_at = time.monotonic()
            containment.reap_orphans()  # daemons of the job that exited by themselves
        return None

    def wait(self, timeout: float) -> None:
        """Sleep until a member exits or `timeout` passes: the watch loop notices a short job's end at once
        instead of at its next poll interval. Without pidfds (or while launching), a plain sleep."""
        if self._outcome is not None or len(self._exit_fds) != self.spec.members or len(self.processes) < self.spec.members:
            time.sleep(timeout)
            return
        # Only members still running: an exited one's pidfd stays readable (a gang's other members run on).
        running = [fd for fd, process in zip(self._exit_fds, self.processes) if process.returncode is None]
        if not running:
            time.sleep(timeout)
            return
        try:
            # Output wakes it too: the readers start at once, so the job never waits on a full pipe.
            ready, _, _ = select.select(running + self._waited_pipes(), [], [], timeout)
        except (OSError, ValueError):
            self._start_readers()
            time.sleep(timeout)
            return
        if any(not isinstance(fd, int) for fd in ready):
            self._check_pipes(0)

    def cancel(self, kind: EndKind = EndKind.CANCELLED, reason: str = "cancelled") -> None:
        if self._stop_outcome is None:
            self._stop_outcome = Outcome(kind, reason)
        self._signal_members()

    @property
    def launched(self) -> int:
        return len(self.processes)

    def _launch_some(self) -> None:
        """Start members until all are running or this poll's slice is spent; a failure stops the gang."""
        deadline = time.monotonic() + self.launch_slice_seconds
        while len(self.processes) < self.spec.members:
            rank = len(self.processes)
            try:
                self._spawn(rank)
            except (OSError, subprocess.SubprocessError) as exc:
                command = self.spec.command[0] if self.spec.command else "?"
                reason = f"could not start {command!r}: {getattr(exc, 'strerror', None) or exc}"
                # All members start or none: the ones already running are stopped at once.
                self._stop_outcome = Outcome(EndKind.LAUNCH_FAILED, reason)
                return
            if time.monotonic() >= deadline:
                return

    def _spawn(self, rank: int) -> None:
        assert self.spec.command
        env = LocalExecutor._environment(self.spec, rank, self.folder) | self.contained.environment()
        start = self.contained.member_setup(rank, self.spec.cpu_millis, self.spec.memory_bytes)
        command = self.spec.command
        if start.preexec is None:
            # Started with vfork through the launcher or `setpriv --pdeathsig` (see Containment.member_setup);
            # the program is found here first, so that a missing one fails the launch as Popen's own lookup would.
            command = [*start.prefix, _resolve(command[0], env.get("PATH"), self.folder), *command[1:]]
        try:
            process = subprocess.Popen(
                command,
                cwd=self.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=start.preexec,
            )
        finally:
            start.close()
        self.processes.append(process)
        self.contained.add_member(process.pid)
        watched = False
        try:
            self._exit_fds.append(os.pidfd_open(process.pid))
            watched = True
        except (AttributeError, OSError):  # no pidfd here: wait() sleeps its interval
            pass
        for stream, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
            assert pipe is not None
            self._unread.append((pipe, stream, rank))
        if not watched or self.spec.members > 1:
            self._start_readers()  # wait() sleeps without pidfds, and a gang's launch spans several polls

    def _waited_pipes(self) -> list[IO[bytes]]:
        return [pipe for pipe, _, _ in self._unread if pipe not in self._closed]

    def _check_pipes(self, timeout: float) -> None:
        """Start the readers once a pipe holds output. A pipe readable with nothing in it is at its end (every
        writer gone, as at the member's exit): the finish reads it, and it is no longer waited on."""
        try:
            ready, _, _ = select.select(self._waited_pipes(), [], [], timeout)
            for pipe in ready:
                waiting = array.array("i", [0])
                fcntl.ioctl(pipe.fileno(), termios.FIONREAD, waiting)
                if waiting[0] > 0:
                    self._start_readers()
                    return
                self._closed.add(pipe)
        except (OSError, ValueError):
            self._start_readers()  # cannot tell: read them as before

    def _start_readers(self) -> None:
        for pipe, stream, rank in self._unread:
            reader = threading.Thread(target=_pump, args=(pipe, stream, rank, self.logs), name=f"log-reader-{stream}-{rank}",
                                      daemon=True)
            reader.start()
            self.readers.append(reader)
        self._unread = []
        self._closed.clear()

    def _check_for_stop(self, codes: list[int | None]) -> None:
        timeout = self.spec.timeout_seconds
        if timeout is not None and time.monotonic() - self.started > timeout:
            self.cancel(EndKind.TIMEOUT, f"timed out after {timeout}s")
            return
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                who = f"member {rank} of {self.spec.members} " if self.spec.members > 1 else ""
                reason = f"{who}exited with code {code}" if code > 0 else f"{who}killed by signal {-code}"
                # One member failing fails the gang: the others are stopped.
                self._stop_outcome = Outcome(EndKind.EXITED, reason, exit_code=code, details={"member": rank})
                self._signal_members()
                return

    def _signal_members(self) -> None:
        """SIGTERM everything the attempt started, then SIGKILL after the grace period."""
        now = time.monotonic()
        grace = 0.0 if self._stop_outcome and self._stop_outcome.kind == EndKind.LAUNCH_FAILED else self.kill_grace_seconds
        if self._term_sent_at is None:
            self._term_sent_at = now
            self.contained.signal(signal.SIGKILL if grace <= 0 else signal.SIGTERM)
        elif now - self._term_sent_at >= grace:
            self.contained.signal(signal.SIGKILL)

    def _finish(self, outcome: Outcome) -> Outcome | None:
        # Leave nothing behind: what the members started may outlive them (escaped, daemonized). Until it
        # is all gone the attempt has not ended: its GPUs are not free yet.
        if not self.contained.kill_all():
            return None
        if self._unread:
            self._check_pipes(0)  # output left in a pipe: its readers start now and are joined below
        if self._unread and all(pipe in self._closed for pipe, _, _ in self._unread):
            # At their end and empty (the member printed nothing): nothing to read, no thread to start.
            for pipe, _, _ in self._unread:
                pipe.close()
            self._unread = []
            self._closed.clear()
        elif self._unread:
            self._start_readers()  # still held open by a process no longer of the attempt: read as before
        deadline = time.monotonic() + 5
        for reader in self.readers:
            reader.join(timeout=max(0.0, deadline - time.monotonic()))
        self.contained.release()
        for fd in self._exit_fds:
            os.close(fd)
        self._exit_fds = []
        self._outcome = outcome
        return outcome


class LocalExecutor:
    name = "local"

    def __init__(
        self, workdir: str | Path, kill_grace_seconds: float = 10.0, cgroup: str = "auto",
        launch_slice_seconds: float = LAUNCH_SLICE_SECONDS, launcher: str | None = None,
    ) -> None:
        # Resolved once (symlinks, `..`): each attempt's folder under it is then absolute and resolved as made, and
        # JOB_WORKDIR needs no realpath walk per member.
        self.workdir = Path(workdir).resolve()
        self.launcher = launcher  # workers/executors/launcher.py: None starts members through sh and setpriv
        self.kill_grace_seconds = kill_grace_seconds
        self.launch_slice_seconds = launch_slice_seconds
        self.jobs_cgroup = containment.prepare_jobs_cgroup(cgroup)
        containment.become_subreaper()

    def launch(self, spec: JobSpec, logs: LogSink) -> LocalExecution | FinishedExecution:
        """Members start from the execution's first polls on (a slice per poll), so that a cancel interrupts a launch."""
        if not spec.command:
            return FinishedExecution(
                Outcome(EndKind.LAUNCH_FAILED, "the local executor cannot run an image: the job has no command")
            )
        spec = spec.with_rendezvous("127.0.0.1", free_port())  # members find member 0 as torch.distributed expects
        folder = self.workdir / spec.job_id / f"attempt-{spec.attempt}"
        folder.mkdir(parents=True, exist_ok=True)
        contained = containment.Containment(spec.job_id, spec.attempt, self.jobs_cgroup, self.launcher)
        return LocalExecution(spec, logs, folder, contained, self.kill_grace_seconds, self.launch_slice_seconds)

    @staticmethod
    def _environment(spec: JobSpec, rank: int, folder: Path) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env.update(spec.env)
        env.update(spec.base_environment(rank))
        per_member = spec.gpus
        mine = spec.gpu_indices[rank * per_member : (rank + 1) * per_member]
        # An empty value hides every GPU: a job that asked for none must not grab one.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in mine)
        env["JOB_WORKDIR"] = str(folder)
        return env


def _resolve(program: str, path: str | None, cwd: Path) -> str:
    """The executable `program` names, as execvpe finds it (a name with a slash is taken as it is, relative
    to the member's folder); FileNotFoundError or PermissionError as Popen raises them otherwise."""
    if "/" in program:
        found = str(cwd / program) if not os.path.isabs(program) else program
        if not os.path.exists(found):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if os.path.isdir(found) or not os.access(found, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        return found
    denied = False
    for folder in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or str(cwd), program)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = True
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def _pump(pipe: IO[bytes], stream: str, member: int, logs: LogSink) -> None:
    with pipe:
        for raw in iter(lambda: pipe.readline(PIECE_BYTES), b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            logs([LogLine(datetime.now(timezone.utc), stream, line, member)])
            if getattr(logs, "full", False):
                _discard(pipe, logs.dropped)  # type: ignore[attr-defined]
                return


def _discard(pipe: IO[bytes], dropped: Callable[[int, int], None]) -> None:
    """The log is full: read on (the job must not block on its pipe), counting lines and bytes in bulk
    instead of a Python object per line (`yes` would keep a core busy)."""
    lines = size = 0
    partial = False
    read = getattr(pipe, "read1", pipe.read)
    for chunk in iter(lambda: read(PIECE_BYTES), b""):
        newlines = chunk.count(b"\n")
        lines += newlines
        size += len(chunk) - newlines
        partial = not chunk.endswith(b"\n")
        if lines >= 100_000:
            dropped(lines, size)
            lines = size = 0
    dropped(lines + (1 if partial else 0), size)
