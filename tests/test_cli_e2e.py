"""The `jobservice` client commands against the real service: a live API with authentication on, the real
scheduler and Celery workers. Some runs go through the installed entry point as a subprocess (app.cli hands
client commands to jobservice_cli), the rest through click's runner, which still talks real HTTP."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from app.db import Database
from config import Settings
from jobservice_cli import exits, render
from jobservice_cli.commands import cli
from tests.conftest import LiveServer, free_port, make_token

JOB_ID = re.compile(r"^job-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z ")


@pytest.fixture(scope="module")
def cli_server(settings: Settings, database: Database) -> Iterator[LiveServer]:
    server = LiveServer(settings.with_overrides(auth_enabled=True))
    yield server
    server.stop()


@pytest.fixture
def client_env(cli_server: LiveServer, tmp_path: Path) -> dict[str, str]:
    """What a user's shell holds: the service's URL and a token; no config file unless a test writes one."""
    return {
        "JOBSERVICE_URL": cli_server.url,
        "JOBSERVICE_TOKEN": make_token("alice", "jobs:read jobs:write"),
        "JOBSERVICE_CONFIG": str(tmp_path / "config.toml"),
    }


def run_cli(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def jobservice(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed `jobservice` entry point, as a user runs it."""
    entry = Path(sys.executable).with_name("jobservice")
    command = [str(entry)] if entry.exists() else [sys.executable, "-m", "app.cli"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSERVICE_")}
    return subprocess.run([*command, *args], env={**full_env, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fleet(start_worker: Any, start_scheduler: Any) -> None:
    start_worker("cli-node", concurrency=2)
    start_scheduler()


def test_submit_wait_exits_with_the_outcome_through_the_entry_point(client_env: dict[str, str], fleet: None) -> None:
    done = jobservice(client_env, "submit", "--wait", "-p", "70", "--", "sh", "-c", "echo hello from the cli")
    assert done.returncode == exits.OK, done.stderr
    job_id = done.stdout.strip()
    assert JOB_ID.match(job_id), done.stdout  # stdout is the id alone: JOB=$(jobservice submit ...) works
    assert "succeeded" in done.stderr

    failed = jobservice(client_env, "submit", "--wait", "--", "sh", "-c", "exit 3")
    assert failed.returncode == exits.JOB_FAILED, failed.stderr
    assert "failed" in failed.stderr and "exit code 3" in failed.stderr

    logs = run_cli(client_env, "logs", job_id)
    assert logs.exit_code == 0 and logs.stdout == "hello from the cli\n"
    stamped = run_cli(client_env, "logs", job_id, "--timestamps")
    assert TIMESTAMP.match(stamped.stdout) and stamped.stdout.endswith(" hello from the cli\n")

    listed = run_cli(client_env, "ls", "--status", "succeeded", "-q")
    assert listed.stdout.split() == [job_id]
    table = run_cli(client_env, "ls")
    assert job_id in table.stdout and "succeeded" in table.stdout and "failed" in table.stdout
    as_json = json.loads(run_cli(client_env, "-o", "json", "get", job_id).stdout)
    assert as_json["status"] == "succeeded" and as_json["priority"] == 70 and as_json["node"] == "cli-node"
    shown = run_cli(client_env, "get", job_id).stdout
    assert "sh -c echo hello from the cli" in shown and "local/cli-node" in shown

    timeline = run_cli(client_env, "events", job_id).stdout
    for transition in ("- -> pending", "pending -> queued", "queued -> running", "running -> succeeded"):
        assert transition in timeline, timeline
    followed = run_cli(client_env, "events", "-f", job_id)  # an ended job: the whole timeline, then the stream ends
    assert followed.exit_code == 0 and "running -> succeeded" in followed.stdout
    explained = run_cli(client_env, "explain", job_id).stdout
    assert "SUCCEEDED" in explained and "local/cli-node" in explained

    clusters = run_cli(client_env, "clusters").stdout
    assert re.search(r"^local +local +healthy +1 ", clusters, re.M), clusters
    nodes = run_cli(client_env, "clusters", "local").stdout
    node_row = next(line for line in nodes.splitlines() if line.startswith("cli-node"))
    assert "ready" in node_row and "Gi/" in node_row, nodes  # memory free/total in human units


def test_follow_streams_logs_and_a_timed_out_wait_leaves_the_job_running(client_env: dict[str, str], fleet: None) -> None:
    followed = run_cli(client_env, "submit", "--follow", "--", "sh", "-c", "for i in 1 2 3; do echo step $i; sleep 0.3; done; exit 4")
    assert followed.exit_code == exits.JOB_FAILED, followed.stderr
    job_id, *lines = followed.stdout.splitlines()
    assert JOB_ID.match(job_id) and lines == ["step 1", "step 2", "step 3"]

    slow = run_cli(client_env, "submit", "--wait", "--wait-timeout", "1", "--", "sleep", "60")
    assert slow.exit_code == exits.TIMEOUT, slow.stderr
    slow_id = slow.stdout.strip()
    assert json.loads(run_cli(client_env, "-o", "json", "get", slow_id).stdout)["status"] in ("queued", "running")
    assert "still" in slow.stderr and f"jobservice cancel {slow_id}" in slow.stderr

    cancelled = run_cli(client_env, "cancel", slow_id)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    assert run_cli(client_env, "wait", slow_id).exit_code == exits.JOB_CANCELLED
    again = run_cli(client_env, "cancel", slow_id)
    assert again.exit_code == exits.REFUSED and "CONFLICT" in again.stderr


def test_logs_follow_ends_with_the_job(client_env: dict[str, str], fleet: None) -> None:
    job_id = run_cli(client_env, "submit", "--", "sh", "-c", "echo one; sleep 1; echo two").stdout.strip()
    followed = run_cli(client_env, "logs", "-f", job_id)
    assert followed.exit_code == 0 and followed.stdout == "one\ntwo\n"
    assert "ended" in followed.stderr and "succeeded" in followed.stderr
    assert run_cli(client_env, "logs", "--tail", "1", job_id).stdout == "two\n"


def test_job_file_with_flags_on_top(client_env: dict[str, str], tmp_path: Path) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "job_type: training\npriority: 20\ncommand: [python, train.py]\n"
        "resources: {cpu: '2', memory: 8Gi}\nconfig: {model: resnet50}\nretry_policy: {max_retries: 2}\n"
    )
    submitted = run_cli(client_env, "-o", "json", "submit", "-f", str(job_file), "-p", "90", "--gpu", "1", "--set", "batch_size=32", "-e", "A=b")
    assert submitted.exit_code == 0, submitted.stderr
    job = json.loads(run_cli(client_env, "-o", "json", "get", json.loads(submitted.stdout)["id"]).stdout)
    assert job["job_type"] == "training" and job["priority"] == 90 and job["command"] == ["python", "train.py"]
    assert job["resources"] == {"cpu": "2", "memory": "8Gi", "gpu": 1}
    assert job["config"] == {"model": "resnet50", "batch_size": 32} and job["env"] == {"A": "b"}
    assert job["retry_policy"]["max_retries"] == 2

    from_stdin = run_cli(client_env, "submit", "-f", "-", input=json.dumps({"job_type": "inference", "command": ["true"]}))
    assert from_stdin.exit_code == 0 and JOB_ID.match(from_stdin.stdout.strip())

    pending = run_cli(client_env, "explain", from_stdin.stdout.strip())
    assert pending.exit_code == 0 and "NO_NODES" in pending.stdout  # no worker in this test
    queues = run_cli(client_env, "queues").stdout
    assert "high-priority" in queues and "default" in queues
    detail = run_cli(client_env, "queues", "high-priority").stdout
    assert json.loads(submitted.stdout)["id"] in detail

    nothing = run_cli(client_env, "submit", "--gpu", "1")
    assert nothing.exit_code == exits.USAGE and "nothing to run" in nothing.stderr
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("- just\n- a list\n")
    assert run_cli(client_env, "submit", "-f", str(bad_file)).exit_code == exits.USAGE


def test_refusals_map_to_exit_codes_with_the_envelope_shown(client_env: dict[str, str]) -> None:
    invalid = run_cli(client_env, "submit", "--memory", "lots", "--", "true")
    assert invalid.exit_code == exits.REFUSED and "VALIDATION_ERROR" in invalid.stderr and "resources.memory" in invalid.stderr
    missing = run_cli(client_env, "get", "job-000000000000")
    assert missing.exit_code == exits.REFUSED and "NOT_FOUND" in missing.stderr

    no_token = run_cli({**client_env, "JOBSERVICE_TOKEN": ""}, "ls")
    assert no_token.exit_code == exits.AUTH and "JOBSERVICE_TOKEN" in no_token.stderr
    read_only = run_cli({**client_env, "JOBSERVICE_TOKEN": make_token("alice", "jobs:read")}, "submit", "--", "true")
    assert read_only.exit_code == exits.AUTH and "FORBIDDEN" in read_only.stderr
    down = run_cli({**client_env, "JOBSERVICE_URL": f"http://127.0.0.1:{free_port()}"}, "queues")
    assert down.exit_code == exits.UNAVAILABLE and "cannot reach" in down.stderr


def test_url_and_token_from_the_config_file_and_flags_first(client_env: dict[str, str], cli_server: LiveServer, tmp_path: Path) -> None:
    config = Path(client_env["JOBSERVICE_CONFIG"])
    config.write_text(f'url = "{cli_server.url}/api/v1/"\ntoken = "{make_token("carol", "jobs:read")}"\noutput = "json"\n')
    only_file = {"JOBSERVICE_CONFIG": str(config)}
    listed = run_cli(only_file, "ls")
    assert listed.exit_code == 0 and json.loads(listed.stdout)["total"] == 0  # JSON: the file's `output`

    down = f"http://127.0.0.1:{free_port()}"
    assert run_cli({**only_file, "JOBSERVICE_URL": down}, "ls").exit_code == exits.UNAVAILABLE  # env beats the file
    assert run_cli({**only_file, "JOBSERVICE_URL": down}, "--url", cli_server.url, "ls").exit_code == 0  # flag beats env
    assert run_cli(only_file, "--token", "not-a-jwt", "ls").exit_code == exits.AUTH

    config.write_text('colour = "blue"\n')
    wrong = run_cli(only_file, "ls")
    assert wrong.exit_code == exits.USAGE and "unknown keys colour" in wrong.stderr


def test_fairness_is_shown_where_the_service_has_it(client_env: dict[str, str], cli_server: LiveServer) -> None:
    run_cli(client_env, "submit", "--", "true")  # alice has a backlog of one
    answer = run_cli(client_env, "fairness")
    assert answer.exit_code == 0, answer.stderr
    row = next(line for line in answer.stdout.splitlines() if line.startswith("alice"))
    assert row.split()[1:2] == ["1"] and row.split()[6] == "1", answer.stdout  # weight 1, one pending
    assert "half-life" in answer.stderr


def test_fairness_on_a_service_without_it(client_env: dict[str, str], settings: Settings, database: Database) -> None:
    """An older service answers 404 for /fairness: said plainly, exit 4, no traceback."""
    from flask import abort, request

    server = LiveServer(settings.with_overrides(auth_enabled=True))
    try:
        # Answer /fairness as a service from before GET /api/v1/fairness does: not found, in the envelope.
        def no_fairness() -> None:
            if request.path.startswith("/api/v1/fairness"):
                abort(404)

        server.app.before_request_funcs.setdefault(None, []).insert(0, no_fairness)
        answer = run_cli({**client_env, "JOBSERVICE_URL": server.url}, "fairness")
        assert answer.exit_code == exits.REFUSED and "has no fairness endpoint" in answer.stderr, answer.stderr
    finally:
        server.stop()


def test_unknown_shapes_render_as_tables() -> None:
    with render.out.capture() as captured:
        render.generic({"window_seconds": 3600, "callers": [{"caller": "alice", "share": 0.5}, {"caller": "bob", "share": 0.25}]})
    text = captured.get()
    assert "window_seconds" in text and "3600" in text and "CALLER" in text and "alice" in text and "0.25" in text


def test_shell_completion_offers_commands_and_job_ids(client_env: dict[str, str]) -> None:
    job_id = run_cli(client_env, "submit", "--", "true").stdout.strip()
    commands = jobservice({**client_env, "_JOBSERVICE_COMPLETE": "bash_complete", "COMP_WORDS": "jobservice lo", "COMP_CWORD": "1"})
    assert commands.returncode == 0 and "plain,logs" in commands.stdout.splitlines(), commands.stdout + commands.stderr
    ids = jobservice({**client_env, "_JOBSERVICE_COMPLETE": "bash_complete", "COMP_WORDS": "jobservice get job-", "COMP_CWORD": "2"})
    assert f"plain,{job_id}" in ids.stdout.splitlines(), ids.stdout + ids.stderr
    script = jobservice(client_env, "completion", "bash")
    assert script.returncode == 0 and "_JOBSERVICE_COMPLETE=bash_complete" in script.stdout


def test_service_commands_stay_with_the_service(client_env: dict[str, str]) -> None:
    token = jobservice({"JWT_SECRET_KEY": "x" * 40}, "token", "alice")
    assert token.returncode == 0 and token.stdout.count(".") == 2
    as_json = jobservice(client_env, "-o", "json", "ls")  # a global option first is still the client's
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["items"] == [], as_json.stderr
    helped = jobservice({}, "--help")
    assert helped.returncode == 0 and "run" in helped.stdout and "submit" in helped.stdout


def test_followed_logs_resume_where_a_closed_stream_stopped(settings: Settings, database: Database, fleet: None, tmp_path: Path) -> None:
    """The server ends each stream after STREAM_MAX_SECONDS; the client resumes with Last-Event-ID: every line
    once, in order, and a quick job's lines written before the stream opened are there too."""
    server = LiveServer(settings.with_overrides(auth_enabled=True, stream_max_seconds=0.4, stream_poll_seconds=0.05))
    try:
        env = {"JOBSERVICE_URL": server.url, "JOBSERVICE_TOKEN": make_token("alice"), "JOBSERVICE_CONFIG": str(tmp_path / "none.toml")}
        script = "for i in $(seq 1 12); do echo line $i; sleep 0.15; done"
        followed = run_cli(env, "submit", "--follow", "--", "sh", "-c", script)
        assert followed.exit_code == 0, followed.stderr
        assert followed.stdout.splitlines()[1:] == [f"line {i}" for i in range(1, 13)]
        quick = run_cli(env, "submit", "--follow", "--", "echo", "at once")
        assert quick.exit_code == 0 and quick.stdout.splitlines()[1:] == ["at once"]
    finally:
        server.stop()


def test_client_commands_start_without_the_service() -> None:
    """`jobservice ls` does not import Flask, SQLAlchemy or Celery (a second of start-up on every call)."""
    script = (
        "import sys\nfrom jobservice_cli import main\ncode = main(['ls', '--help'])\n"
        "heavy = sorted(m for m in ('app', 'flask', 'sqlalchemy', 'celery') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr
