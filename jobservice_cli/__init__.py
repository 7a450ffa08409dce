"""`jobservice submit|ls|get|logs|events|explain|cancel|wait|queues|clusters|fairness|completion`: the
command line for people who submit jobs, an HTTP client of the REST API (no Flask, no database).

`app.cli.main` (the `jobservice` entry point) hands every command that is not one of the service's own
(`run`, `scheduler`, `token`, ...) to `run`.
"""
from __future__ import annotations

from collections.abc import Collection

from config import ClientSettings


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
