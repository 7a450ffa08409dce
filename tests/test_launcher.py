"""The member launcher (workers/executors/launcher.c): built with the host's compiler, refused when it does not
work, and as strict as the shell and setpriv it replaces about what it will not run."""
from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config import parse_launcher
from workers.executors import launcher as launcher_module
from workers.executors.launcher import launcher

COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler on this host: workers start members through sh and setpriv")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test resolves the launcher itself, not from what an earlier one cached for this process."""
    monkeypatch.setattr(launcher_module, "_resolved", {})


# Where the launcher can be built without the C library (launcher.c, JOBSERVICE_NOLIBC): auto must choose that build.
NOLIBC_HOST = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")


@pytest.fixture(params=list(launcher_module.BUILDS))
def built(request: pytest.FixtureRequest, tmp_path: Path, fresh: None) -> str:
    """The launcher as each of its builds makes it: they must behave the same."""
    if COMPILER is None:
        pytest.skip("no C compiler on this host")
    path = launcher_module.build(tmp_path / "bin" / "jobservice-launch", [request.param])
    if path is None:
        if request.param == "static" or (request.param == "nolibc" and not NOLIBC_HOST):
            pytest.skip(f"the {request.param} build is not possible on this host")
        pytest.fail(f"the {request.param} build of the launcher failed")
    return path


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, **kwargs)  # type: ignore[call-overload]


@needs_compiler
def test_it_is_built_once_per_source_and_reused(tmp_path: Path, fresh: None) -> None:
    first = launcher("auto", tmp_path / "bin")
    assert first is not None and Path(first).parent == (tmp_path / "bin").resolve()
    assert Path(first).name.startswith("jobservice-launch-") and os.access(first, os.X_OK)
    built_at = Path(first).stat().st_mtime_ns
    launcher_module._resolved.clear()  # another process on the host: finds the build, does not redo it
    assert launcher("auto", tmp_path / "bin") == first and Path(first).stat().st_mtime_ns == built_at
    assert [p.name for p in (tmp_path / "bin").iterdir()] == [Path(first).name], "no partial build is left behind"


@needs_compiler
@pytest.mark.skipif(not NOLIBC_HOST, reason="the launcher needs the C library on this platform")
def test_auto_builds_it_without_the_c_library_where_it_can(tmp_path: Path, fresh: None) -> None:
    path = launcher("auto", tmp_path / "bin")
    assert path is not None
    # A static glibc carries its tunables' names ("glibc.malloc.arena_max", ...); a dynamic one names its loader.
    image = Path(path).read_bytes()
    assert b"glibc." not in image and b"ld-linux" not in image


def test_it_runs_the_program_with_its_arguments_and_passes_its_exit_code_on(built: str, tmp_path: Path) -> None:
    done = run([built, str(os.getpid()), "-", "/bin/sh", "-c", 'echo "$0|$1"; exit 3', "a b", "c"])
    assert (done.returncode, done.stdout) == (3, "a b|c\n")


def test_the_program_gets_the_environment_it_was_started_with(built: str) -> None:
    done = run([built, str(os.getpid()), "-", "/usr/bin/env"], env={"JOB_A": "1 2", "JOB_EMPTY": "", "JOB_UTF8": "é"})
    assert done.returncode == 0 and done.stdout.splitlines() == ["JOB_A=1 2", "JOB_EMPTY=", "JOB_UTF8=é"], done.stderr


def test_a_launcher_that_loses_the_environment_is_not_used(tmp_path: Path, fresh: None) -> None:
    wiping = tmp_path / "wiping"
    wiping.write_text('#!/bin/sh\nshift 2\nexec env -i "$@"\n')  # runs the program with its arguments, in an empty environment
    wiping.chmod(0o755)
    assert launcher(str(wiping), tmp_path / "bin") is None


def test_a_member_it_starts_has_the_kill_death_signal(built: str) -> None:
    # /proc shows no death signal; a process can ask for its own: prctl(PR_GET_PDEATHSIG) in a tiny Python.
    probe = "import ctypes, sys; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
    done = run([built, str(os.getpid()), "-", shutil.which("python3") or "/usr/bin/python3", "-c", probe])
    assert done.returncode == 0 and done.stdout.strip() == "9", done.stderr


def test_a_member_whose_worker_is_already_gone_never_runs(built: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # Its parent is this process, not the pid it was told: as after the worker died and it was re-parented.
    done = run([built, "999999", "-", "/usr/bin/touch", str(marker)])
    assert done.returncode == 125 and not marker.exists()


def test_a_member_that_cannot_join_its_cgroup_never_runs(built: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    missing = tmp_path / "no-such-cgroup" / "cgroup.procs"
    done = run([built, str(os.getpid()), str(missing), "/usr/bin/touch", str(marker)])
    assert done.returncode == 125 and f"cannot join the attempt's cgroup ({missing})" in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("argv", [[], ["1234"], ["12x", "-", "/bin/true"], ["1", "-", "/bin/true"], ["", "-", "/bin/true"]])
def test_bad_arguments_run_nothing(built: str, argv: list[str]) -> None:
    done = run([built, *argv])
    assert done.returncode == 125 and done.stderr


def test_a_program_that_cannot_run_is_reported_as_exec_reports_it(built: str, tmp_path: Path) -> None:
    plain = tmp_path / "data"
    plain.write_text("not a program")
    done = run([built, str(os.getpid()), "-", str(plain)])
    assert done.returncode == 127 and "cannot run" in done.stderr and "Permission denied" in done.stderr
    # A script without a #! line runs under /bin/sh, as execvp (and so setpriv) runs it.
    plain.chmod(0o755)
    plain.write_text("echo from-sh\n")
    done = run([built, str(os.getpid()), "-", str(plain)])
    assert (done.returncode, done.stdout) == (0, "from-sh\n")


def test_off_and_a_launcher_that_does_not_work_fall_back_to_sh_and_setpriv(
    tmp_path: Path, fresh: None, caplog: pytest.LogCaptureFixture,
) -> None:
    assert launcher("off", tmp_path / "bin") is None and not (tmp_path / "bin").exists()
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\nexit 0\n")  # runs, but never runs the member
    broken.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="jobservice.worker"):
        assert launcher(str(broken), tmp_path / "bin") is None
    assert "does not run a trial member" in caplog.text


@needs_compiler
def test_a_prebuilt_launcher_named_by_its_path_is_used(tmp_path: Path, fresh: None) -> None:
    path = launcher("auto", tmp_path / "cache")
    assert path is not None
    prebuilt = tmp_path / "opt" / "jobservice-launch"
    prebuilt.parent.mkdir()
    shutil.copy2(path, prebuilt)
    launcher_module._resolved.clear()
    assert launcher(str(prebuilt), tmp_path / "unused") == str(prebuilt)
    assert not (tmp_path / "unused").exists()


def test_without_a_compiler_members_start_through_sh_and_setpriv(tmp_path: Path, fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert launcher("auto", tmp_path / "bin") is None
    assert not [p for p in (tmp_path / "bin").iterdir()], "no partial build is left behind"
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    launcher_module._resolved.clear()
    assert launcher("auto", tmp_path / "bin") is None


def test_the_setting_is_auto_off_or_an_absolute_path() -> None:
    assert parse_launcher("") == "auto" and parse_launcher(" off ") == "off"
    assert parse_launcher("/opt/jobservice/launch") == "/opt/jobservice/launch"
    for bad in ("launch", "./launch", "bin/launch", "/x\0y", "/" + "a" * 5000):
        with pytest.raises(ValueError, match="WORKER_LAUNCHER"):
            parse_launcher(bad)


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_the_worker_starts_its_members_as_worker_launcher_says(tmp_path: Path, fresh: None, setting: str) -> None:
    from config import Settings
    from workers.context import build_executor

    if setting == "auto" and COMPILER is None:
        pytest.skip("no C compiler on this host: auto and off both start members through sh and setpriv")
    settings = Settings.from_env({"JOBSERVICE_DATA_DIR": str(tmp_path / "data"), "WORKER_LAUNCHER": setting, "WORKER_CGROUP": "off"})
    executor = build_executor(settings)
    if setting == "auto":
        assert executor.launcher is not None and Path(executor.launcher).parent == (tmp_path / "data" / "bin").resolve()  # type: ignore[attr-defined]
    else:
        assert executor.launcher is None  # type: ignore[attr-defined]


@needs_compiler
def test_workers_starting_together_build_one_launcher_and_each_uses_it(tmp_path: Path) -> None:
    """Several workers on a host starting at once into the same empty folder: each builds beside the final name and
    renames, so none runs a half-written file and none is left behind."""
    root = Path(__file__).resolve().parent.parent
    probe = "import sys; from workers.executors.launcher import launcher; print(launcher('auto', sys.argv[1]))"
    workers = [subprocess.Popen([sys.executable, "-c", probe, str(tmp_path / "bin")], cwd=root, stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    found = {worker.communicate(timeout=120)[0].strip() for worker in workers}
    assert all(worker.returncode == 0 for worker in workers)
    assert len(found) == 1 and "None" not in found, found
    assert [p.name for p in (tmp_path / "bin").iterdir()] == [Path(found.pop()).name]
