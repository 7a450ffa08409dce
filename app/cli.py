"""`jobservice`: run the whole service (embedded defaults included), or one of its processes."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from app import logs
from app.embedded import ensure_services
from config import Settings

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("jobservice")


def run(args: argparse.Namespace) -> int:
    """Start PostgreSQL/Redis if no URL is set, apply migrations, then every Procfile process."""
    settings = Settings.from_env()
    services = ensure_services(settings.database_url, settings.redis_url, settings.data_dir, settings.embedded_redis_port)
    env = dict(os.environ, DATABASE_URL=services.database_url or "", REDIS_URL=services.redis_url or "")
    # The Procfile's commands (gunicorn, celery, jobservice) live beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(dev_auth_env(settings))
    try:
        subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], env=env, cwd=ROOT, check=True)
        # honcho hands out $PORT from --port, in steps of 100 in Procfile order: `web` comes first.
        command = [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "start", "--port", str(settings.port)]
        if args.processes:
            command += args.processes
        processes = subprocess.Popen(command, env=env, cwd=ROOT)
        # A SIGTERM must stop the processes and the embedded servers too, not orphan them.
        signal.signal(signal.SIGTERM, lambda *_: processes.send_signal(signal.SIGTERM))
        try:
            return processes.wait()
        except KeyboardInterrupt:
            processes.send_signal(signal.SIGINT)
            return processes.wait()
    finally:
        services.stop()


def dev_auth_env(settings: Settings) -> dict[str, str]:
    """A development signing secret kept in the data folder, unless keys are configured."""
    if settings.jwt_secret_key or settings.jwt_public_key or settings.jwt_jwks_url:
        return {}
    secret_file = Path(settings.data_dir).resolve() / "jwt-secret"
    if not secret_file.exists():
        import secrets

        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret_file.write_text(secrets.token_urlsafe(48))
        secret_file.chmod(0o600)
    return {"JWT_SECRET_KEY": secret_file.read_text().strip()}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobservice", description=__doc__, epilog="Client commands (over HTTP): submit, ls, get, logs, "
                                     "events, explain, cancel, wait, queues, clusters, fairness, completion: `jobservice COMMAND --help`.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run API, scheduler, worker and Flower (embedded PostgreSQL/Redis if no URL is set)")
    run_parser.add_argument("processes", nargs="*", help="only these Procfile processes (default: all)")
    run_parser.set_defaults(func=run)
    commands.add_parser("scheduler", help="run the scheduler loop").set_defaults(func=scheduler)
    token_parser = commands.add_parser("token", help="print a development token for SUB (no database needed)")
    token_parser.add_argument("sub")
    token_parser.add_argument("--scope", action="append", default=[], help='e.g. "jobs:read jobs:write" (default: both)')
    token_parser.add_argument("--expires-in", type=int, default=24 * 3600, help="lifetime in seconds")
    token_parser.set_defaults(func=token)
    import jobservice_cli  # the client commands (submit, ls, logs, ...): everything that is not the service's own

    if jobservice_cli.handles(sys.argv[1:] if argv is None else argv, commands.choices):
        return jobservice_cli.run(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
