"""`jobservice submit|ls|get|logs|events|explain|cancel|wait|queues|clusters|fairness|completion`: the
command line for people who submit jobs, an HTTP client of the REST API (no Flask, no database).

The `jobservice` console script is `main` here: client commands start without importing the service, the
service's own commands go to `app.cli.main`, which in turn hands anything that is not one of them to `run`
(so `python -m app.cli submit ...` works too).
"""
from __future__ import annotations

import sys
from collections.abc import Collection

from config import ClientSettings


def main(argv: list[str] | None = None) -> int:
    """The `jobservice` console script. A client command runs without importing the service (Flask,
    SQLAlchemy, Celery: a second of start-up on each call); the rest goes to app.cli, the service's own
    commands (run, scheduler, token, probe, ...) and its --help."""
    argv = sys.argv[1:] if argv is None else argv
    from jobservice_cli.commands import cli

    first = argv[0] if argv else ""
    if ClientSettings.from_env().completing or first in cli.commands or (first.startswith("-") and first not in ("-h", "--help")):
        return run(argv)
    from app.cli import main as service_main

    return service_main(argv)


def run(argv: list[str]) -> int:
    from jobservice_cli.commands import cli

    try:
        cli.main(args=argv, prog_name="jobservice", complete_var="_JOBSERVICE_COMPLETE", standalone_mode=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def handles(argv: list[str], service_commands: Collection[str]) -> bool:
    """Whether these arguments are a client command (or the shell asking for completions)."""
    if ClientSettings.from_env().completing:
        return True
    # The service's parser has no option of its own but --help: `jobservice -o json ls` is the client's.
    return bool(argv) and argv[0] not in service_commands and argv[0] not in ("-h", "--help")
