"""`jobservice`: run the whole service (embedded defaults included), or one of its processes."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from app import logs
from app.embedded import ensure_services
from config import Settings

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("jobservice")


def run(args: argparse.Namespace) -> int:
    """Start PostgreSQL/Redis if no URL is set, apply migrations, then supervise every Procfile process."""
    from app.supervisor import AlreadyRunning, Supervisor, clean_leftovers, read_procfile

    settings = Settings.from_env()
    procfile = Path(args.procfile) if args.procfile else ROOT / "Procfile"
    try:
        specs = read_procfile(procfile, args.processes, base_port=settings.port)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    # Before anything binds a port: what a SIGKILLed run left (gunicorn holding :8000, its Redis) goes first.
    state_file = Path(settings.data_dir).resolve() / "run.json"
    try:
        clean_leftovers(state_file)
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    busy = busy_ports(ports_needed(settings, specs))
    if busy:
        log.error("cannot start: %s", "; ".join(busy))
        return 1
    services = ensure_services(settings.database_url, settings.redis_url, settings.data_dir, settings.embedded_redis_port)
    env = dict(os.environ, DATABASE_URL=services.database_url or "", REDIS_URL=services.redis_url or "")
    # The Procfile's commands (gunicorn, celery, jobservice) live beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(dev_auth_env(settings))
    try:
        subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], env=env, cwd=ROOT, check=True)
        try:
            supervisor = Supervisor(
                specs, env, ROOT, state_file,
                backoff_seconds=settings.restart_backoff_seconds,
                backoff_max_seconds=settings.restart_backoff_max_seconds,
                # A stopping worker drains: its jobs get WORKER_DRAIN_SECONDS, then the kill grace, before SIGKILL.
                stop_grace_seconds=max(settings.stop_grace_seconds, settings.worker_drain_seconds + settings.kill_grace_seconds + 10)
                if any(spec.name == "worker" for spec in specs) else settings.stop_grace_seconds,
                others=services.pids(),
            )
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        return supervisor.run()
    finally:
        services.stop()


def ports_needed(settings: Settings, specs: list[Any]) -> list[tuple[int, str]]:
    """The TCP ports this run will listen on, each with the variable that moves it."""
    names = {spec.name for spec in specs}
    needed = [(spec.port, "PORT") for spec in specs if spec.name == "web" and spec.port]
    if "flower" in names:
        needed.append((settings.flower_port, "FLOWER_PORT"))
    if not settings.redis_url:
        needed.append((settings.embedded_redis_port, "EMBEDDED_REDIS_PORT"))
    return needed


def busy_ports(needed: list[tuple[int, str]]) -> list[str]:
    """Checked before anything starts, so a clash is named at once rather than by a process dying later."""
    import socket

    busy = []
    for port, variable in needed:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no clash
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                busy.append(f"port {port} is in use (set {variable} to use another)")
    return busy


def dev_auth_env(settings: Settings) -> dict[str, str]:
    """A development signing secret kept in the data folder, unless keys are configured."""
    from app.embedded import development_secret

    if settings.jwt_secret_key or settings.jwt_public_key or settings.jwt_jwks_url:
        return {}
    return {"JWT_SECRET_KEY": development_secret(settings.data_dir)}


def token(args: argparse.Namespace) -> int:
    """A development token signed with JWT_SECRET_KEY, or the secret `jobservice run` keeps in the data folder."""
    from app.api.auth import mint_token, parse_scopes

    settings = Settings.from_env()
    secret = settings.jwt_secret_key or dev_auth_env(settings).get("JWT_SECRET_KEY")
    scopes = parse_scopes(args.scope) or ["jobs:read", "jobs:write"]
    print(mint_token(settings.with_overrides(jwt_secret_key=secret), args.sub, scopes, args.expires_in))
    return 0


def scheduler(args: argparse.Namespace) -> int:
    from app.scheduler import run_forever

    run_forever(Settings.from_env())
    return 0


def probe(args: argparse.Namespace) -> int:
    """Exit 0 while the process's loop has made progress within --max-age seconds (a Kubernetes exec probe)."""
    from app import heartbeat

    path = heartbeat.path_for(Settings.from_env(), args.process)
    age = heartbeat.age_seconds(path)
    if age is None:
        print(f"{args.process}: no heartbeat file {path}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"{args.process}: last heartbeat {age:.0f} s ago (more than {args.max_age:g} s), {path}", file=sys.stderr)
        return 1
    return 0


def positive_seconds(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 86400")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobservice", description=__doc__, epilog="Client commands (over HTTP): submit, ls, get, logs, "
                                     "events, explain, cancel, wait, queues, clusters, fairness, completion: `jobservice COMMAND --help`.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run API, scheduler, worker and Flower (embedded PostgreSQL/Redis if no URL is set)")
    run_parser.add_argument("processes", nargs="*", help="only these Procfile processes (default: all)")
    run_parser.add_argument("--procfile", help="another Procfile (default: the repository's)")
    run_parser.set_defaults(func=run)
    commands.add_parser("scheduler", help="run the scheduler loop").set_defaults(func=scheduler)
    token_parser = commands.add_parser("token", help="print a development token for SUB (no database needed)")
    token_parser.add_argument("sub")
    token_parser.add_argument("--scope", action="append", default=[], help='e.g. "jobs:read jobs:write" (default: both)')
    token_parser.add_argument("--expires-in", type=int, default=24 * 3600, help="lifetime in seconds")
    token_parser.set_defaults(func=token)
    probe_parser = commands.add_parser("probe", help="exit 1 unless the scheduler's or this worker's loop beat recently")
    probe_parser.add_argument("process", choices=["scheduler", "worker"])
    probe_parser.add_argument("--max-age", type=positive_seconds, default=60.0, help="seconds (default 60)")
    probe_parser.set_defaults(func=probe)
    import jobservice_cli  # the client commands (submit, ls, logs, ...): everything that is not the service's own

    if jobservice_cli.handles(sys.argv[1:] if argv is None else argv, commands.choices):
        return jobservice_cli.run(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
