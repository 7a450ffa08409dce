"""The local executor: a job's command as processes on the worker's own host (bare GPU hosts, the embedded default).

Each member runs in its own session (process group) so that a timeout or a cancel kills everything
the job started, and dies with the worker (PR_SET_PDEATHSIG) rather than outliving it unsupervised.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from workers.executors.base import EndKind, JobSpec, LogLine, LogSink, Outcome, free_port

# Variables a job inherits from the worker; everything else (database URLs, secrets) stays out.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LD_LIBRARY_PATH")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the worker's lease recovery still covers a dead worker
        pass


class FinishedExecution:
    """An execution that ended before it began (nothing to run)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def poll(self) -> Outcome | None:
        return self.outcome

    def cancel(self, kind: EndKind = EndKind.CANCELLED, reason: str = "cancelled") -> None:
        pass


class LocalExecution:
    def __init__(self, spec: JobSpec, processes: list[subprocess.Popen[bytes]], readers: list[threading.Thread], kill_grace_seconds: float) -> None:
        self.spec = spec
        self.processes = processes
        self.readers = readers
        self.kill_grace_seconds = kill_grace_seconds
        self.started = time.monotonic()
        self._stop_outcome: Outcome | None = None
        self._term_sent_at: float | None = None

    def poll(self) -> Outcome | None:
        codes = [p.poll() for p in self.processes]
        if self._stop_outcome is None:
            self._check_for_stop(codes)
        if self._stop_outcome is not None:
            if any(code is None for code in codes):
                self._signal_members()
                return None
            return self._finish(self._stop_outcome)
        if all(code == 0 for code in codes):
            return self._finish(Outcome(EndKind.EXITED, "exit code 0", exit_code=0))
        return None

    def cancel(self, kind: EndKind = EndKind.CANCELLED, reason: str = "cancelled") -> None:
        if self._stop_outcome is None:
            self._stop_outcome = Outcome(kind, reason)
        self._signal_members()

    def _check_for_stop(self, codes: list[int | None]) -> None:
        timeout = self.spec.timeout_seconds
        if timeout is not None and time.monotonic() - self.started > timeout:
            self.cancel(EndKind.TIMEOUT, f"timed out after {timeout}s")
            return
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                who = f"member {rank} of {len(codes)} " if len(codes) > 1 else ""
                reason = f"{who}exited with code {code}" if code > 0 else f"{who}killed by signal {-code}"
                # One member failing fails the gang: the others are stopped.
                self._stop_outcome = Outcome(EndKind.EXITED, reason, exit_code=code, details={"member": rank})
                self._signal_members()
                return

    def _signal_members(self) -> None:
        """SIGTERM the members' process groups, then SIGKILL after the grace period."""
        now = time.monotonic()
        if self._term_sent_at is None:
            self._term_sent_at = now
            self._kill_groups(signal.SIGTERM)
        elif now - self._term_sent_at >= self.kill_grace_seconds:
            self._kill_groups(signal.SIGKILL)

    def _kill_groups(self, sig: signal.Signals) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _finish(self, outcome: Outcome) -> Outcome:
        # Leave nothing behind: a member's children may outlive the member itself.
        self._kill_groups(signal.SIGKILL)
        for reader in self.readers:
            reader.join(timeout=5)
        return outcome


class LocalExecutor:
    name = "local"

    def __init__(self, workdir: str | Path, kill_grace_seconds: float = 10.0) -> None:
        self.workdir = Path(workdir)
        self.kill_grace_seconds = kill_grace_seconds

    def launch(self, spec: JobSpec, logs: LogSink) -> LocalExecution | FinishedExecution:
        if not spec.command:
            return FinishedExecution(
                Outcome(EndKind.LAUNCH_FAILED, "the local executor cannot run an image: the job has no command")
            )
        spec = spec.with_rendezvous("127.0.0.1", free_port())  # members find member 0 as torch.distributed expects
        folder = self.workdir / spec.job_id / f"attempt-{spec.attempt}"
        folder.mkdir(parents=True, exist_ok=True)
        processes: list[subprocess.Popen[bytes]] = []
        readers: list[threading.Thread] = []
        try:
            for rank in range(spec.members):
                process = subprocess.Popen(
                    spec.command,
                    cwd=folder,
                    env=self._environment(spec, rank, folder),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
                processes.append(process)
                for stream, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
                    assert pipe is not None
                    reader = threading.Thread(target=_pump, args=(pipe, stream, rank, logs), daemon=True)
                    reader.start()
                    readers.append(reader)
        except OSError as exc:
            reason = f"could not start {spec.command[0]!r}: {exc.strerror or exc}"
            # All members start or none: stop the ones already running.
            started = LocalExecution(spec, processes, readers, kill_grace_seconds=0)
            started.cancel(EndKind.LAUNCH_FAILED, reason)
            while processes and started.poll() is None:
                time.sleep(0.05)
            return FinishedExecution(Outcome(EndKind.LAUNCH_FAILED, reason))
        return LocalExecution(spec, processes, readers, self.kill_grace_seconds)

    @staticmethod
    def _environment(spec: JobSpec, rank: int, folder: Path) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env.update(spec.env)
        env.update(spec.base_environment(rank))
        per_member = spec.gpus
        mine = spec.gpu_indices[rank * per_member : (rank + 1) * per_member]
        # An empty value hides every GPU: a job that asked for none must not grab one.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in mine)
        env["JOB_WORKDIR"] = str(folder.resolve())
        return env


def _pump(pipe: IO[bytes], stream: str, member: int, logs: LogSink) -> None:
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            logs([LogLine(datetime.now(timezone.utc), stream, line, member)])
