"""The client commands of `jobservice`: submit and watch jobs, read their logs and timeline, see queues,
clusters and fair shares. Exit codes are in jobservice_cli.exits."""
from __future__ import annotations

import json
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml
from click.shell_completion import CompletionItem, get_completion_class
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from config import ClientSettings
from jobservice_cli import exits, render
from jobservice_cli.http import ApiError, Client

DEFAULT_URL = "http://localhost:8000"
TERMINAL = frozenset(exits.BY_OUTCOME)
STATES = ("pending", "queued", "running", "succeeded", "failed", "cancelled")
POLL_SECONDS = 1.0
EXPLAIN_EVERY_SECONDS = 3.0
# Most jobs a single `ls --all` pages through (the API answers at most 100 per page).
LS_ALL_LIMIT = 10_000
MAX_TAIL = 100_000  # the API's largest `tail`


@dataclass
class Context:
    url: str
    token: str | None
    output: str
    _client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, self.token)
        return self._client

    @property
    def json(self) -> bool:
        return self.output == "json"


def load_config_file(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        return {}
    try:
        with file.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.UsageError(f"config file {file}: {exc}") from exc
    unknown = set(data) - {"url", "token", "output"}
    if unknown:
        raise click.UsageError(f"config file {file}: unknown keys {', '.join(sorted(unknown))} (known: url, token, output)")
    return data


def resolve(url: str | None, token: str | None, output: str | None, config: str | None) -> Context:
    """Flags, then JOBSERVICE_URL / JOBSERVICE_TOKEN, then the config file, then the local default."""
    settings = ClientSettings.from_env()
    file = load_config_file(config or settings.config_file)
    return Context(
        url=url or settings.url or file.get("url") or DEFAULT_URL,
        token=token or settings.token or file.get("token"),
        output=output or file.get("output") or "table",
    )


def fail(error: ApiError) -> NoReturn:
    render.err.print(Text.assemble(("error: ", "bold red"), str(error)))
    for detail in error.details:
        render.err.print(f"  {detail.get('field') or '-'}: {detail.get('message')}")
    if error.status == 401:
        render.err.print("  (set a token: --token, JOBSERVICE_TOKEN or `token` in the config file; `jobservice token NAME` mints one locally)")
    raise SystemExit(error.exit_code)


def call(function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except ApiError as error:
        fail(error)


def _complete_job_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Recent job ids for the shell to offer; silence if the service cannot be asked."""
    root = ctx.find_root().params
    try:
        context = resolve(root.get("url"), root.get("token"), None, root.get("config"))
        page = context.client.get("/jobs/", limit=100)
    except (ApiError, click.UsageError):
        return []
    return [CompletionItem(job["id"], help=job["status"]) for job in page["items"] if job["id"].startswith(incomplete)]


JOB_ID = click.argument("job_id", shell_complete=_complete_job_ids)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--url", metavar="URL", help=f"Service URL [env JOBSERVICE_URL; config `url`; default {DEFAULT_URL}]")
@click.option("--token", metavar="JWT", help="Bearer token [env JOBSERVICE_TOKEN; config `token`]")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), help="Tables for people (default) or the API's JSON")
@click.option("--config", metavar="PATH", help="Config file [env JOBSERVICE_CONFIG; default ~/.config/jobservice/config.toml]")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None, output: str | None, config: str | None) -> None:
    """Submit jobs to the Job Service and watch them.

    \b
    Exit codes: 0 ok / job succeeded, 1 job failed, 2 usage, 3 job cancelled,
    4 refused (400/404/409), 5 token (401/403), 6 unreachable or server error,
    124 wait timed out, 130 interrupted.
    """
    context = resolve(url, token, output, config)
    ctx.obj = context
    ctx.call_on_close(lambda: context._client.close() if context._client else None)


# --- submit and wait ---------------------------------------------------------------------------------


def _key_values(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint=option)
        result[name] = value
    return result


def _config_values(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--config-set key=value`: the value as JSON when it parses (numbers, true, lists), else as a string."""
    result: dict[str, Any] = {}
    for name, value in _key_values(pairs, "--set").items():
        try:
            result[name] = json.loads(value)
        except ValueError:
            result[name] = value
    return result


def load_job_file(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        body = yaml.safe_load(text)  # YAML is a superset of JSON: one loader reads both
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(str(exc), param_hint="--file") from exc
    if not isinstance(body, dict):
        raise click.BadParameter("a job file holds one object (job_type, command, resources, ...)", param_hint="--file")
    return body


def build_job(file: str | None, command: tuple[str, ...], **flags: Any) -> dict[str, Any]:
    """The POST /jobs/ body: the job file's fields, overridden by each flag given."""
    body = load_job_file(file) if file else {}
    simple = {"job_type": flags["job_type"], "priority": flags["priority"], "image": flags["image"], "timeout_seconds": flags["timeout"]}
    body.update({key: value for key, value in simple.items() if value is not None})
    if command:
        body["command"] = list(command)
    if flags["env"]:
        body["env"] = {**body.get("env", {}), **_key_values(flags["env"], "--env")}
    if flags["config_values"]:
        body["config"] = {**body.get("config", {}), **_config_values(flags["config_values"])}
    resources = {"gpu": flags["gpu"], "cpu": flags["cpu"], "memory": flags["memory"]}
    if any(v is not None for v in resources.values()):
        body["resources"] = {**body.get("resources", {}), **{k: v for k, v in resources.items() if v is not None}}
    retry = {"max_retries": flags["retries"], "backoff_multiplier": flags["backoff"]}
    if any(v is not None for v in retry.values()):
        body["retry_policy"] = {**body.get("retry_policy", {}), **{k: v for k, v in retry.items() if v is not None}}
    if flags["gang"] is not None:
        body["gang"] = {"enabled": flags["gang"] > 1, "min_members": flags["gang"]}
    body.setdefault("job_type", "cli")
    if "command" not in body and "image" not in body:
        raise click.UsageError("nothing to run: give a command after the flags (`-- python train.py`), --image, or a job file")
    return body


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-f", "--file", "file", metavar="PATH", help="Job file, YAML or JSON (`-` reads stdin); flags override its fields")
@click.option("-t", "--type", "job_type", metavar="TYPE", help="job_type (default: cli)")
@click.option("-p", "--priority", type=click.IntRange(0, 100), help="0..100 (JOB_QUEUES maps it to a queue)")
@click.option("--image", help="Container image (Kubernetes workers)")
@click.option("--gpu", type=click.IntRange(0, None), help="GPUs per member")
@click.option("--cpu", metavar="QTY", help="CPU per member: 2, 500m")
@click.option("--memory", metavar="QTY", help="Memory per member: 8Gi, 512Mi")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE", help="Environment variable (repeatable)")
@click.option("--set", "config_values", multiple=True, metavar="KEY=VALUE", help="A `config` entry, JSON values parsed (repeatable)")
@click.option("--timeout", type=click.IntRange(1, None), metavar="SECONDS", help="timeout_seconds of each attempt")
@click.option("--retries", type=click.IntRange(0, None), help="retry_policy.max_retries")
@click.option("--backoff", type=click.FloatRange(1, 10), help="retry_policy.backoff_multiplier")
@click.option("--gang", type=click.IntRange(1, None), metavar="N", help="Run N members together (a gang)")
@click.option("-w", "--wait", is_flag=True, help="Show a live status line until the job ends; exit with its outcome")
@click.option("-F", "--follow", is_flag=True, help="Stream its logs until it ends (implies --wait)")
@click.option("--wait-timeout", type=click.FloatRange(0, None, min_open=True), metavar="SECONDS", help="Stop waiting after this (exit 124)")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def submit(ctx: Context, file: str | None, command: tuple[str, ...], wait: bool, follow: bool, wait_timeout: float | None, **flags: Any) -> None:
    """Submit a job: COMMAND after the flags, or a job file.

    Prints the job id alone on stdout, so `JOB=$(jobservice submit -- sh -c 'echo hi')` captures it.

    \b
      jobservice submit --gpu 1 --memory 8Gi -p 80 -- python train.py --epochs 3
      jobservice submit -f job.yaml --wait
    """
    body = build_job(file, command, **flags)
    job = call(ctx.client.post, "/jobs/", body)
    if ctx.json:
        render.dump_json(job)
    else:
        print(job["id"], flush=True)
        position = f", position {job['queue_position']}" if job.get("queue_position") else ""
        render.err.print(Text.assemble("submitted ", (job["id"], "bold"), f" ({job['status']}{position})"))
    if follow:
        raise SystemExit(_follow_then_outcome(ctx, job["id"], wait_timeout))
    if wait:
        raise SystemExit(wait_for_outcome(ctx, job["id"], wait_timeout))


@cli.command("wait")
@JOB_ID
@click.option("--timeout", "wait_timeout", type=click.FloatRange(0, None, min_open=True), metavar="SECONDS", help="Stop waiting after this (exit 124)")
@click.pass_obj
def wait_command(ctx: Context, job_id: str, wait_timeout: float | None) -> None:
    """Wait for a job to end, with a live status line; exit with its outcome (0, 1 failed, 3 cancelled)."""
    raise SystemExit(wait_for_outcome(ctx, job_id, wait_timeout))


def _status_line(job: dict[str, Any], explanation: dict[str, Any] | None, started: float) -> Text:
    line = Text.assemble((job["id"], "bold"), " ", render.status(job["status"]))
    if job["status"] in ("queued", "running") and job.get("node"):
        line.append(f" on {job.get('cluster') or 'local'}/{job['node']}")
    if job.get("retry_count"):
        line.append(f" (retry {job['retry_count']})")
    if job["status"] == "pending" and explanation:
        line.append(f"  {explanation.get('reason')}: {explanation.get('message')}", style="dim")
    line.append(f"  {render.duration(time.monotonic() - started)}", style="dim")
    return line


def wait_for_outcome(ctx: Context, job_id: str, timeout: float | None) -> int:
    """Poll the job until it ends: a live status line on a terminal, one line per change otherwise."""
    started = time.monotonic()
    explanation: dict[str, Any] | None = None
    explained_at = 0.0
    last_seen: tuple[str, str | None] | None = None
    live = Live(Spinner("dots"), console=render.err, transient=True, refresh_per_second=8) if render.err.is_terminal else None
    try:
        if live:
            live.start()
        while True:
            job = call(ctx.client.get, f"/jobs/{job_id}")
            if job["status"] in TERMINAL:
                break
            if job["status"] == "pending" and time.monotonic() - explained_at >= EXPLAIN_EVERY_SECONDS:
                explanation = call(ctx.client.get, f"/jobs/{job_id}/explain")
                explained_at = time.monotonic()
            line = _status_line(job, explanation, started)
            if live:
                live.update(Spinner("dots", text=line))
            elif (job["status"], explanation and explanation.get("reason")) != last_seen:
                render.err.print(line)
            last_seen = (job["status"], explanation and explanation.get("reason"))
            if timeout is not None and time.monotonic() - started >= timeout:
                render.err.print(f"{job_id} is still {job['status']} after {timeout:g}s; it goes on (jobservice cancel {job_id})")
                return exits.TIMEOUT
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        render.err.print(f"stopped waiting; {job_id} goes on (jobservice cancel {job_id})")
        return exits.INTERRUPTED
    finally:
        if live:
            live.stop()
    return _outcome(job)


def _outcome(job: dict[str, Any]) -> int:
    detail = f" (exit code {job['exit_code']})" if job.get("exit_code") is not None else ""
    reason = f": {job['status_reason']}" if job.get("status_reason") and job["status"] != "succeeded" else ""
    render.err.print(Text.assemble((job["id"], "bold"), " ", render.status(job["status"]), detail, reason))
    return exits.BY_OUTCOME[job["status"]]


def _follow_then_outcome(ctx: Context, job_id: str, timeout: float | None) -> int:
    started = time.monotonic()
    try:
        # Every line the job wrote so far first: a quick job may have printed before the stream opened.
        for event in ctx.client.stream(f"/jobs/{job_id}/logs", tail=MAX_TAIL, timestamps=False):
            if event.event == "message":
                print(event.data, flush=True)
            if timeout is not None and time.monotonic() - started >= timeout:
                render.err.print(f"stopped following after {timeout:g}s; {job_id} goes on")
                return exits.TIMEOUT
    except ApiError as error:
        fail(error)
    except KeyboardInterrupt:
        render.err.print(f"stopped following; {job_id} goes on (jobservice cancel {job_id})")
        return exits.INTERRUPTED
    return _outcome(call(ctx.client.get, f"/jobs/{job_id}"))


# --- reading jobs ------------------------------------------------------------------------------------


@cli.command("ls")
@click.option("-s", "--status", type=click.Choice(STATES), help="Only jobs in this state")
@click.option("-t", "--type", "job_type", metavar="TYPE", help="Only this job_type")
@click.option("--priority-min", type=click.IntRange(0, 100), help="Only jobs of this priority or higher")
@click.option("-n", "--limit", type=click.IntRange(1, 100), default=50, show_default=True, help="Jobs per page")
@click.option("--offset", type=click.IntRange(0, None), default=0, help="Skip this many")
@click.option("-a", "--all", "every", is_flag=True, help=f"Every matching job, page by page (at most {LS_ALL_LIMIT})")
@click.option("-q", "--quiet", is_flag=True, help="Job ids only, one a line")
@click.pass_obj
def list_jobs(ctx: Context, status: str | None, job_type: str | None, priority_min: int | None, limit: int, offset: int, every: bool, quiet: bool) -> None:
    """List jobs, newest first."""
    items: list[dict[str, Any]] = []
    total = 0
    while True:
        page = call(ctx.client.get, "/jobs/", status=status, job_type=job_type, priority_min=priority_min, limit=limit, offset=offset + len(items))
        items += page["items"]
        total = page["total"]
        if not every or not page["items"] or len(items) >= min(total - offset, LS_ALL_LIMIT):
            break
    if ctx.json:
        render.dump_json({"items": items, "total": total, "limit": limit, "offset": offset})
        return
    if quiet:
        for job in items:
            print(job["id"])
        return
    grid = render.table("ID", "TYPE", "PRI", "STATUS", "AGE", "STARTED")
    for job in items:
        grid.add_row(job["id"], job["job_type"], str(job["priority"]), render.status(job["status"]), render.age(job["created_at"]), render.age(job.get("started_at")))
    render.out.print(grid)
    if total > offset + len(items):
        render.err.print(f"{len(items)} of {total} shown (--offset {offset + len(items)} for more, or --all)", style="dim")


@cli.command("get")
@JOB_ID
@click.pass_obj
def get_job(ctx: Context, job_id: str) -> None:
    """A job's details."""
    job = call(ctx.client.get, f"/jobs/{job_id}")
    if ctx.json:
        render.dump_json(job)
        return
    resources = job.get("resources") or {}
    where = f"{job['cluster']}/{job['node']}" if job.get("node") else None
    retry = job.get("retry_policy") or {}
    render.out.print(render.fields([
        ("id", job["id"]),
        ("status", render.status(job["status"])),
        ("reason", job.get("status_reason")),
        ("type", job["job_type"]),
        ("priority", f"{job['priority']} (queue {job.get('queue')}" + (f", position {job['queue_position']})" if job.get("queue_position") else ")")),
        ("command", " ".join(job["command"]) if job.get("command") else None),
        ("image", job.get("image")),
        ("resources", f"{resources.get('gpu', 0)} GPU, {resources.get('cpu')} CPU, {resources.get('memory')} memory"),
        ("gang", f"{job['gang']['min_members']} members" if (job.get("gang") or {}).get("enabled") else None),
        ("env", " ".join(f"{k}={v}" for k, v in (job.get("env") or {}).items()) or None),
        ("config", json.dumps(job["config"]) if job.get("config") else None),
        ("created", job.get("created_at")),
        ("started", job.get("started_at")),
        ("completed", job.get("completed_at") or job.get("cancelled_at")),
        ("retries", f"{job.get('retry_count', 0)} of {retry.get('max_retries')} (backoff x{retry.get('backoff_multiplier')})"),
        ("timeout", f"{job['timeout_seconds']}s" if job.get("timeout_seconds") else None),
        ("exit code", job.get("exit_code")),
        ("node", where),
        ("worker", job.get("worker_id")),
    ]))


@cli.command("logs")
@JOB_ID
@click.option("-f", "--follow", is_flag=True, help="Stream new lines until the job ends")
@click.option("--tail", type=click.IntRange(0, MAX_TAIL), default=100, show_default=True, help="Lines from the end first")
@click.option("--timestamps", is_flag=True, help="Prefix each line with its time")
@click.pass_obj
def logs(ctx: Context, job_id: str, follow: bool, tail: int, timestamps: bool) -> None:
    """A job's log: the last lines, or (-f) a live stream that ends with the job."""
    if not follow:
        sys.stdout.write(call(ctx.client.text, f"/jobs/{job_id}/logs", tail=tail, timestamps=timestamps))
        return
    try:
        for event in ctx.client.stream(f"/jobs/{job_id}/logs", tail=tail, timestamps=timestamps):
            if event.event == "message":
                print(event.data, flush=True)
            elif event.event == "end":
                render.err.print(Text.assemble((job_id, "bold"), " ended ", render.status(event.data)))
    except ApiError as error:
        fail(error)
    except KeyboardInterrupt:
        raise SystemExit(exits.INTERRUPTED) from None


def _event_row(event: dict[str, Any]) -> tuple[Any, ...]:
    where = f"{event['cluster']}/{event['node']}" if event.get("node") else "-"
    return (
        render.moment(event["at"]), Text.assemble(event.get("from_status") or "-", " -> ", render.status(event["to_status"])), event.get("reason") or "",
        event.get("actor") or "-", where, render.cell(event.get("exit_code")),
    )


@cli.command("events")
@JOB_ID
@click.option("-f", "--follow", is_flag=True, help="Stream transitions until the job ends")
@click.pass_obj
def events(ctx: Context, job_id: str, follow: bool) -> None:
    """A job's timeline: every transition, who made it and why."""
    if not follow:
        timeline = call(ctx.client.get, f"/jobs/{job_id}/events")
        if ctx.json:
            render.dump_json(timeline)
            return
        grid = render.table("AT", "TRANSITION", "REASON", "BY", "NODE", "EXIT")
        for event in timeline["events"]:
            grid.add_row(*_event_row(event))
        render.out.print(grid)
        return
    try:
        for message in ctx.client.stream(f"/jobs/{job_id}/events"):
            if message.event == "end":
                break
            event = json.loads(message.data)
            if ctx.json:
                print(json.dumps(event), flush=True)
            else:
                at, transition, reason, actor, where, code = _event_row(event)
                render.out.print(Text.assemble(at, "  ", transition, f"  {reason}", (f"  by {actor}", "dim"), f"  {where}" if where != "-" else ""))
    except ApiError as error:
        fail(error)
    except KeyboardInterrupt:
        raise SystemExit(exits.INTERRUPTED) from None


@cli.command("explain")
@JOB_ID
@click.pass_obj
def explain(ctx: Context, job_id: str) -> None:
    """Why a job is not running (yet), its place in the queue and an estimated start."""
    answer = call(ctx.client.get, f"/jobs/{job_id}/explain")
    if ctx.json:
        render.dump_json(answer)
        return
    blocking = answer.get("blocking")
    blocked_by = answer.get("blocked_by")
    wait = answer.get("estimated_wait_seconds")
    render.out.print(render.fields([
        ("job", answer["job_id"]),
        ("status", render.status(answer["status"])),
        ("reason", Text(answer["reason"], style="bold")),
        ("", answer.get("message")),
        ("queue", answer.get("queue") + (f", position {answer['queue_position']}" if answer.get("queue_position") else "")),
        ("blocking", f"{blocking['resource']}: needs {blocking['requested']}, {blocking['free']} free on {blocking.get('node') or '-'}" if blocking else None),
        ("blocked by", f"{blocked_by['job_id']} (priority {blocked_by['priority']}, {blocked_by['reason']})" if blocked_by else None),
        ("retry at", answer.get("retry_at")),
        ("start", f"{answer['estimated_start_at']} (in about {render.duration(wait)})" if answer.get("estimated_start_at") else answer.get("estimate_basis")),
        ("node", f"{answer['cluster']}/{answer['node']}" if answer.get("node") else None),
        ("since", answer.get("since")),
        ("exit code", answer.get("exit_code")),
    ]))


@cli.command("cancel")
@click.argument("job_ids", nargs=-1, required=True, shell_complete=_complete_job_ids)
@click.pass_obj
def cancel(ctx: Context, job_ids: tuple[str, ...]) -> None:
    """Cancel jobs (pending, queued or running). Exit 4 if any could not be cancelled."""
    code = exits.OK
    for job_id in job_ids:
        try:
            answer = ctx.client.delete(f"/jobs/{job_id}")
        except ApiError as error:
            render.err.print(Text.assemble((f"{job_id}: ", "bold"), (str(error), "red")))
            code = max(code, error.exit_code)
            continue
        if ctx.json:
            print(json.dumps(answer), flush=True)
        else:
            render.out.print(Text.assemble((answer["id"], "bold"), " ", render.status(answer["status"])))
    raise SystemExit(code)


# --- the service's state ------------------------------------------------------------------------------


@cli.command("queues")
@click.argument("name", required=False)
@click.pass_obj
def queues(ctx: Context, name: str | None) -> None:
    """Queues: depth, running, limits and oldest wait; with NAME, its backlog in admission order."""
    if name:
        queue = call(ctx.client.get, f"/queues/{name}")
        if ctx.json:
            render.dump_json(queue)
            return
        stats = queue.get("stats") or {}
        render.out.print(render.fields([
            ("queue", queue["name"]),
            ("pending", queue["depth"]), ("queued", queue.get("queued")), ("running", f"{queue['processing']} of {queue['max_concurrency']}"),
            ("oldest", render.duration(queue.get("oldest_job_age_seconds"))),
            ("last hour", f"{stats.get('jobs_processed_1h')} ended, wait {render.duration(stats.get('avg_wait_time_seconds'))}, "
                          f"run {render.duration(stats.get('avg_processing_time_seconds'))}"),
        ]))
        grid = render.table("#", "JOB", "PRI", "WAITING", "RETRY AT")
        for position, job in enumerate(queue["jobs"], start=1):
            grid.add_row(str(position), job["id"], str(job["priority"]), render.age(job.get("queued_at")), job.get("retry_at") or "")
        render.out.print(grid)
        return
    answer = call(ctx.client.get, "/queues/")
    if ctx.json:
        render.dump_json(answer)
        return
    grid = render.table("NAME", "PENDING", "QUEUED", "RUNNING", "MAX", "OLDEST")
    for queue in answer["queues"]:
        grid.add_row(queue["name"], str(queue["depth"]), str(queue.get("queued", "-")), str(queue["processing"]), str(queue["max_concurrency"]),
                     render.duration(queue.get("oldest_job_age_seconds")))
    render.out.print(grid)


@cli.command("clusters")
@click.argument("name", required=False)
@click.pass_obj
def clusters(ctx: Context, name: str | None) -> None:
    """Clusters and their GPUs; with NAME, each node's GPUs, CPU and memory."""
    if name:
        cluster = call(ctx.client.get, f"/clusters/{name}")
        if ctx.json:
            render.dump_json(cluster)
            return
        capacity = cluster.get("capacity") or {}
        render.err.print(f"{cluster['name']} ({cluster['kind']}): {cluster['status']}, {capacity.get('current_jobs', '-')} jobs running")
        grid = render.table("NODE", "STATUS", "GPU FREE/TOTAL", "GPU TYPE", "CPU FREE/TOTAL", "MEMORY FREE/TOTAL", *(["STATE"] if any("state" in n for n in cluster["nodes"]) else []))
        for node in cluster["nodes"]:
            gpus, cpu, memory = node.get("gpus") or {}, node.get("cpu") or {}, node.get("memory") or {}
            row = [node["name"], node.get("status", "-"), f"{gpus.get('available', '-')}/{gpus.get('total', '-')}", gpus.get("type") or "-",
                   f"{cpu.get('available', '-')}/{cpu.get('total', '-')}", f"{memory.get('available', '-')}/{memory.get('total', '-')}"]
            if "state" in node:  # cordon/drain (operators' API), where the service has it
                row.append(render.cell(node["state"]))
            grid.add_row(*row)
        render.out.print(grid)
        return
    answer = call(ctx.client.get, "/clusters/")
    if ctx.json:
        render.dump_json(answer)
        return
    grid = render.table("NAME", "KIND", "STATUS", "NODES", "GPU FREE/TOTAL", "RUNNING")
    for cluster in answer["clusters"]:
        grid.add_row(cluster["name"], cluster.get("kind", "-"), cluster["status"], render.cell(cluster.get("total_nodes")),
                     f"{render.cell(cluster.get('available_gpus'))}/{render.cell(cluster.get('total_gpus'))}", render.cell(cluster.get("running_jobs")))
    render.out.print(grid)


@cli.command("fairness")
@click.pass_obj
def fairness(ctx: Context) -> None:
    """Each caller's fair share and use, where the service offers GET /api/v1/fairness."""
    try:
        answer = ctx.client.get("/fairness")
    except ApiError as error:
        if error.status == 404:
            render.err.print(f"{ctx.client.base_url} has no fairness endpoint (GET /api/v1/fairness): a newer service has it")
            raise SystemExit(exits.REFUSED) from None
        fail(error)
    if ctx.json:
        render.dump_json(answer)
    elif isinstance(answer, dict) and isinstance(answer.get("owners"), list):
        half_life = answer.get("half_life_seconds")
        render.err.print(f"usage decays with a half-life of {render.duration(half_life)}; at equal priority the lowest share goes first")
        grid = render.table("OWNER", "WEIGHT", "SHARE", "USED", "HELD", "RANK", "PENDING", "GPU-H", "CPU-H", "MEM GIB-H")
        for owner in answer["owners"]:
            grid.add_row(
                render.cell(owner.get("owner")), _number(owner.get("weight")), _number(owner.get("share")), _number(owner.get("usage_share")),
                _number(owner.get("held_share")), render.cell(owner.get("rank")), render.cell(owner.get("pending")),
                _number(_hours(owner.get("gpu_seconds"))), _number(_hours(owner.get("cpu_seconds"))), _number(_hours(owner.get("memory_gib_seconds"))),
            )
        render.out.print(grid)
    else:  # a shape this client does not know yet
        render.generic(answer)


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: `eval "$(jobservice completion bash)"` (or add it to ~/.bashrc)."""
    completer = get_completion_class(shell)
    assert completer is not None
    print(completer(cli, {}, "jobservice", "_JOBSERVICE_COMPLETE").source())
