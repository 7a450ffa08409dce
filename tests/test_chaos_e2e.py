"""The chaos benchmark's short variant: database sessions dropped under load, the whole stack real."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent


def test_no_job_lost_stuck_doubled_or_misreported_when_database_sessions_drop(
    backing_services: tuple[str, str], tmp_path: Path
) -> None:
    database_url, _ = backing_services
    # A database of its own on the test server, named after the test database so parallel suites never share it.
    chaos_database = f"{make_url(database_url).database}_chaos"
    result_file = tmp_path / "chaos.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--faults", "db", "--jobs", "250", "--rate", "12",
         "--db-drops", "10", "--seed", "7", "--database", chaos_database, "--time-limit", "200", "--json", str(result_file)],
        env={**os.environ, "DATABASE_URL": database_url}, cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert result_file.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["sessions_terminated"] > 0 and result["accepted_load"] > 200, run.stdout
    assert result["malformed_record_lines"] == 0, run.stdout
    for row in ("lost", "stuck", "run_twice_concurrently", "run_more_than_allowed", "rerun_after_success", "contradictions"):
        assert result[row] == 0, f"{row}:\n{run.stdout}"
    assert result["faults"][-1]["recovery_seconds"] is not None, run.stdout
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
