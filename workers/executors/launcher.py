"""The member launcher (launcher.c): how a local member joins its cgroup and gets its death signal in one exec.

A member must be in its attempt's cgroup before it runs and must die with its worker (PR_SET_PDEATHSIG).
Python can do neither between vfork and exec, and a preexec_fn forces a real fork of the worker, so the
member is started through a small program that does both and execs it. Without the launcher that was
`sh -c 'echo 0 > cgroup.procs; exec "$@"'` and then `setpriv --pdeathsig KILL --`: two more execs, whose
CPU (about 1.3 ms against 0.3 ms for the static launcher, `benchmarks/worker_steps.py`) was a tenth of
all the CPU a job of `true` costs the host.

`WORKER_LAUNCHER` chooses it: `auto` (default) builds launcher.c with the host's C compiler (`$CC`, `cc`
or `gcc`) once into `$JOBSERVICE_DATA_DIR/bin`, named by a hash of its source: without the C library where it
can (x86-64 and arm64 Linux: BUILDS), else static, else plain; and it falls back to sh and
setpriv where there is no compiler; `off` always uses sh and setpriv; a path names a launcher built
elsewhere (an image built without a compiler). A launcher is used only once it ran a trial member.

This module imports neither `app` nor Celery.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("jobservice.worker")

SOURCE = Path(__file__).with_name("launcher.c")
BUILD_TIMEOUT_SECONDS = 120
TRIAL_TIMEOUT_SECONDS = 10
# The first that builds and runs a trial member is used. Without the C library: no start-up detecting the CPU's
# features (CPUID, trapped by a hypervisor); a member of `true` cost 0.62, 0.97 and 1.16 ms of CPU through the three
# on this project's VM, and `true` alone 0.57 (benchmarks/launcher.py).
BUILDS: dict[str, list[str]] = {
    "nolibc": ["-O2", "-static", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector", "-DJOBSERVICE_NOLIBC"],
    "static": ["-O2", "-static"],
    "dynamic": ["-O2"],
}

_resolved: dict[tuple[str, str], str | None] = {}


def launcher(setting: str, cache_dir: str | Path) -> str | None:
    """The launcher to start members with, or None for sh and setpriv; built, found and tried once per process
    (a forked pool process inherits what its worker found before the fork)."""
    key = (setting, str(cache_dir))
    if key not in _resolved:
        _resolved[key] = _resolve(setting, Path(cache_dir))
    return _resolved[key]


def _resolve(setting: str, cache_dir: Path) -> str | None:
    if setting == "off":
        return None
    if setting != "auto":
        if _works(setting):
            return setting
        log.warning("WORKER_LAUNCHER=%s does not run a trial member: members start through sh and setpriv", setting)
        return None
    try:
        source = SOURCE.read_bytes()
    except OSError:  # installed without its source: sh and setpriv
        return None
    target = cache_dir.resolve() / f"jobservice-launch-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.exists() and _works(str(target)):
        return str(target)
    built = build(target)
    if built is None:
        log.info("no C compiler built the member launcher: members start through sh and setpriv (about 1 ms more each)")
    return built


def build(target: Path, builds: list[str] | None = None) -> str | None:
    """The launcher built at `target` with the first of `builds` (names in BUILDS, all by default) that works."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("cannot create %s for the member launcher: %s", target.parent, exc)
        return None
    for flags in (BUILDS[name] for name in (builds or BUILDS)):
        # Built beside its final name and renamed: workers starting together never run a half-written file.
        fd, partial = tempfile.mkstemp(prefix=".launch-", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *flags, "-o", partial, str(SOURCE)], stdin=subprocess.DEVNULL, capture_output=True,
                timeout=BUILD_TIMEOUT_SECONDS,
            )
            if done.returncode == 0 and _works(partial):
                os.chmod(partial, 0o755)
                os.replace(partial, target)
                return str(target)
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return None


def _works(path: str) -> bool:
    """It starts a member: the program runs, with its arguments and its environment, and its exit code comes back."""
    shell = shutil.which("sh") or "/bin/sh"
    try:
        trial = subprocess.run(
            [path, str(os.getpid()), "-", shell, "-c", '[ "$JOBSERVICE_LAUNCH_TRIAL" = "a b" ] && exit "$0"', "7"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=TRIAL_TIMEOUT_SECONDS,
            env={**os.environ, "JOBSERVICE_LAUNCH_TRIAL": "a b"},
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return trial.returncode == 7
