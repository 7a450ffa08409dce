"""scripts/run and scripts/test install packages only when setup.cfg or pyproject.toml changed (scripts/install
keeps a stamp of their hash); the pip it runs is a stand-in that records its calls."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_packages_are_installed_only_when_they_changed(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    for name in ("scripts/install", "setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    calls = tmp_path / "pip-calls"
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    python.chmod(0o755)

    def install(*extra: str) -> list[str]:
        before = calls.read_text().splitlines() if calls.exists() else []
        subprocess.run(["bash", "scripts/install", *extra], cwd=tmp_path, check=True, capture_output=True)
        return [c for c in calls.read_text().splitlines()[len(before):] if " -e " in f" {c} "] if calls.exists() else []

    assert install() == ["-m pip install --quiet -e ."]
    assert install() == []  # nothing changed: no pip at all
    assert install("test") == ["-m pip install --quiet -e .[test]"]
    assert install("test") == [] and install() == []  # the test install covers the plain one
    with (tmp_path / "setup.cfg").open("a") as setup:
        setup.write("\n# a new dependency\n")
    assert install() == ["-m pip install --quiet -e ."]
    assert install("test") == ["-m pip install --quiet -e .[test]"]
