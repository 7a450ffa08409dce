"""A one-statement transaction in autocommit (a worker's claim, its end): three ways, alternating rounds.

- `run_alone (app.db)`: what the claim and the end use, the prepared statement straight on a pooled psycopg2
  connection in autocommit, without a Session;
- `attribute (app.db)`: through a Session and `app.db.autocommit_connection`, the connection switched into autocommit
  and back with psycopg2's `autocommit` attribute (app.db's engine);
- `set_isolation_level (SQLAlchemy's)`: the same with the dialect's own switch, after which psycopg2 sends `SET
  default_transaction_isolation TO DEFAULT` before the connection's next statement (a round trip of its own).

It prints the wall time per transaction, this process's CPU and the PostgreSQL backend's CPU (from /proc: run it on
the database's machine).

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test python benchmarks/autocommit.py --transactions 300 --rounds 10
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from app.db import Database, Prepared, autocommit_connection, run_alone  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transactions", type=int, default=300, help="per round and way")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    url = os.environ["DATABASE_URL"]
    ways = {name: Database(url, pool_size=1)
            for name in ("run_alone (app.db)", "attribute (app.db)", "set_isolation_level (SQLAlchemy's)")}
    del ways["set_isolation_level (SQLAlchemy's)"].engine.dialect.set_isolation_level  # the dialect's own method again
    pids = {}
    for name, database in ways.items():
        with database.session() as session:
            pids[name] = session.execute(text("SELECT pg_backend_pid()")).scalar()
    statement = Prepared("jobservice_bench_one", "SELECT :n::int AS n", {"n": "integer"})
    totals = {name: [0.0, 0.0, 0.0] for name in ways}
    for _ in range(args.rounds):
        for name, database in ways.items():
            wall, cpu, server = time.perf_counter(), time.process_time(), backend_cpu(pids[name])
            for n in range(args.transactions):
                with database.session() as session:
                    if name.startswith("run_alone"):
                        run_alone(session, statement, {"n": n})
                    else:
                        statement.execute(autocommit_connection(session), {"n": n}).first()
            totals[name][0] += time.perf_counter() - wall
            totals[name][1] += time.process_time() - cpu
            totals[name][2] += backend_cpu(pids[name]) - server
    count = args.transactions * args.rounds
    print(f"{count} one-statement autocommit transactions each way, in {args.rounds} alternating rounds")
    for name, (wall, cpu, server) in totals.items():
        print(f"  {name:36s} wall {wall / count * 1e6:6.0f} us   client CPU {cpu / count * 1e6:5.0f} us   "
              f"PostgreSQL CPU {server / count * 1e6:5.0f} us")
    for database in ways.values():
        database.dispose()


if __name__ == "__main__":
    main()
