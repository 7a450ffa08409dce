"""Engine and session factory: built from settings by whoever runs (API, scheduler, worker).

Also the one place that knows which database errors are a dropped connection (worth retrying) and
which are bugs (never retried): `is_connection_error`, `retry_on_disconnect`, `Database.retrying`.
"""
from __future__ import annotations

import logging
import random
import re
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Result
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import TextClause

log = logging.getLogger("jobservice.db")
T = TypeVar("T")

# SQLSTATEs PostgreSQL sends when it ends a session itself: class 08 (connection exception), and
# admin_shutdown (pg_terminate_backend, a fast shutdown), crash_shutdown, cannot_connect_now (starting up).
_SESSION_ENDED_STATES = ("57P01", "57P02", "57P03")


_PARAMETER = re.compile(r"(?<![:\w]):([a-z_]+)\b")
_PREPARED_INFO_KEY = "jobservice_prepared"  # in the pooled connection's info, which SQLAlchemy clears when it closes
# A generic plan is made from the statistics of its first execution and kept until they change (an ANALYZE): one made
# while `jobs` was empty (a sequential scan was the cheapest then) would be kept as the table fills up, on a server
# whose autovacuum is off or slow. So each session prepares a statement again this long after it did: the planner
# then sizes the tables from their files, whatever their statistics say. One round trip a minute per statement.
PREPARED_MAX_AGE_SECONDS = 60.0

# Sent with a statement's EXECUTE (SET LOCAL: until the transaction ends). PostgreSQL's own choice (plan_cache_mode
# auto) plans a statement again on every execution whenever its generic plan's estimate is worse than the custom
# ones', however alike the plans: one with an array parameter (whose length a custom plan counts) was planned on every
# scheduler pass, at 0.5 ms of PostgreSQL's CPU, as long as running it.
GENERIC_PLAN = "SET LOCAL plan_cache_mode = force_generic_plan"
# The same, the plan made with sequential scans ruled out wherever an index serves: for a statement whose plan made on
# an empty table (a scan and a sort, the cheapest then) must never be the one kept, even for a minute.
GENERIC_INDEXED_PLAN = f"{GENERIC_PLAN}; SET LOCAL enable_seqscan = off"


class Prepared:
    """A statement PREPAREd once per database session (again every PREPARED_MAX_AGE_SECONDS), then EXECUTEd by name.

    psycopg2 prepares nothing: every execution of a text statement is parsed, analysed and planned again, which for
    the hot paths' statements (the scheduler's snapshot, a worker's claim) cost several times their execution
    (benchmarks/idle_steps.py). Only for statements whose plan has no choice to get wrong blind to the parameters:
    after five executions PostgreSQL keeps a generic plan when its estimate is no worse than the custom ones'.

    `types`: each :name of `sql` and its PostgreSQL type, in the EXECUTE's order. `before`: statements sent in the
    same round trip ahead of the EXECUTE (a SAVEPOINT). `plan`: GENERIC_PLAN or GENERIC_INDEXED_PLAN, sent with each
    EXECUTE; only inside a transaction (SET LOCAL does nothing outside one). A prepared statement lives as long as the
    database session (a rolled-back transaction does not undo it).
    """

    def __init__(self, name: str, sql: str, types: Mapping[str, str], *, before: str = "", plan: str = "") -> None:
        order = list(types)
        unknown = set(_PARAMETER.findall(sql)) - set(order)
        if unknown:
            raise ValueError(f"{name}: untyped parameters {sorted(unknown)}")
        body = _PARAMETER.sub(lambda m: f"${order.index(m.group(1)) + 1}", sql)
        self.name = name
        self.plan = plan
        self.prepare_sql = f"PREPARE {name} ({', '.join(types.values())}) AS {body}"
        self.reprepare_sql = f"DEALLOCATE {name}; {self.prepare_sql}"
        self.execute_sql = f"EXECUTE {name} ({', '.join(f':{p}' for p in order)})"
        # What a round trip of several statements embeds to run it: the plan's settings and the EXECUTE.
        self.run_sql = f"{plan}; {self.execute_sql}" if plan else self.execute_sql
        self._execute = text(f"{before}; {self.run_sql}" if before else self.run_sql)
        # For run_alone: the EXECUTE in psycopg2's own parameter style.
        self._alone = None if before or plan else f"EXECUTE {name} ({', '.join(f'%({p})s' for p in order)})"

    def preparation(self, info: dict[Any, Any]) -> str | None:
        """What to send first on the database session whose pooled connection's info this is: PREPARE the first time,
        DEALLOCATE and PREPARE once the last one is PREPARED_MAX_AGE_SECONDS old, else nothing."""
        at = info.get(_PREPARED_INFO_KEY, {}).get(self.name)
        if at is None:
            return self.prepare_sql
        return self.reprepare_sql if time.monotonic() - at >= PREPARED_MAX_AGE_SECONDS else None

    def prepared(self, info: dict[Any, Any]) -> None:
        """Record that the preparation was sent and went through (one that failed is sent again next time)."""
        info.setdefault(_PREPARED_INFO_KEY, {})[self.name] = time.monotonic()

    def ensure(self, connection: Connection) -> None:
        """Prepared on this connection's database session (a round trip the first time, and once a minute after)."""
        sql = self.preparation(connection.info)
        if sql is not None:
            connection.execute(text(sql))
            self.prepared(connection.info)

    def execute(self, session: Session | Connection, params: Mapping[str, Any] | None = None) -> Result[Any]:
        connection = session.connection() if isinstance(session, Session) else session
        self.ensure(connection)
        return connection.execute(self._execute, dict(params or {}))


def run_alone(session: Session, statement: Prepared, params: Mapping[str, Any]) -> list[Any]:
    """`statement` as a transaction of its own (autocommit: one round trip), its rows with their columns as attributes.

    A session already in a transaction keeps it: the statement joins it, as with autocommit_connection. Otherwise it
    runs straight on a connection of the session's pool, in psycopg2's autocommit, without the session: the Session,
    its transaction, the Connection and the isolation switch and reset around one statement cost the worker's
    claim and end about 120 us of CPU each, several times the round trip's own (benchmarks/autocommit.py). The
    checkout is the pool's (its idle ping included); errors are SQLAlchemy's (DBAPIError), and a connection error
    invalidates the connection, as a statement sent through SQLAlchemy would."""
    bind = session.get_bind()
    if session.in_transaction() or not isinstance(bind, Engine) or statement._alone is None:
        return list(statement.execute(autocommit_connection(session), params).all())
    pooled = bind.raw_connection()
    sent = statement.prepare_sql
    try:
        connection = pooled.driver_connection
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                preparation = statement.preparation(pooled.info)
                if preparation is not None:
                    sent = preparation
                    cursor.execute(preparation)
                    statement.prepared(pooled.info)
                sent = statement._alone
                cursor.execute(sent, params)
                return _rows(cursor)
        finally:
            connection.autocommit = False
    except psycopg2.Error as exc:
        lost = is_connection_error(exc)
        if lost:
            pooled.invalidate(exc)
        raise sa_exc.DBAPIError.instance(sent, params, exc, psycopg2.Error, connection_invalidated=lost) from exc
    finally:
        pooled.close()


_ROW_CLASSES: dict[tuple[str, ...], type] = {}
_PYFORMAT: dict[TextClause, str] = {}


def _rows(cursor: Any) -> list[Any]:
    """A cursor's rows as named tuples (a class per list of columns, made once)."""
    if cursor.description is None:
        return []
    columns = tuple(column.name for column in cursor.description)
    row_class = _ROW_CLASSES.get(columns)
    if row_class is None:
        row_class = _ROW_CLASSES[columns] = namedtuple("Row", columns, rename=True)  # type: ignore[misc]
    return [row_class._make(values) for values in cursor.fetchall()]


def fetch_in_transaction(session: Session, statement: TextClause, params: Mapping[str, Any]) -> list[Any]:
    """`statement`'s rows (their columns as attributes), run in the session's transaction straight on its DBAPI cursor.

    For a hot statement whose rows are few and plain: SQLAlchemy's execution (the compiled cache's lookup, the
    parameters' processing, a CursorResult and its metadata, a Row per row) cost a submit about 0.25 ms of CPU, a third
    of its domain work (benchmarks/submit_breakdown.py). The statement still reaches the engine's before_cursor_execute
    listeners; errors are SQLAlchemy's (DBAPIError: an IntegrityError is one), and a connection error invalidates the
    connection, as a statement executed through SQLAlchemy would."""
    sql = _PYFORMAT.get(statement)
    if sql is None:
        sql = _PYFORMAT[statement] = _PARAMETER.sub(r"%(\1)s", statement.text)
    connection = session.connection()
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        connection.dispatch.before_cursor_execute(connection, cursor, sql, params, None, False)
        cursor.execute(sql, params)
        return _rows(cursor)
    except psycopg2.Error as exc:
        # SQLAlchemy's own handling, as for a statement it executed: the error wrapped (DBAPIError), and on a disconnect
        # this connection and the pool's older ones invalidated (a restart ended them all), the transaction left for the
        # session's rollback. A private method (stable through SQLAlchemy 2.0 and 2.1, which setup.cfg allows).
        connection._handle_dbapi_exception(exc, sql, params, cursor, None)
        raise  # pragma: no cover - it always raises
    finally:
        cursor.close()


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; this service runs on psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means the database connection broke or could not be made, not that the statement was wrong.

    A statement on a dropped connection may or may not have committed, so callers that retry must be
    idempotent. Everything else (an IntegrityError, a cancelled statement, a deadlock) is not a blip and
    must surface.
    """
    if isinstance(exc, sa_exc.DisconnectionError):
        return True  # the pool's pre-ping gave up on a connection
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig  # type: ignore[assignment]
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        code = getattr(exc, "pgcode", None)
        # No SQLSTATE: libpq's own error (server closed the connection, could not connect).
        return code is None or code.startswith("08") or code in _SESSION_ENDED_STATES
    return False


def vacuum(engine: Engine, tables: Sequence[str]) -> None:
    """VACUUM (SKIP_LOCKED) these tables, outside any transaction (VACUUM cannot run in one)."""
    names = ", ".join(f'"{name}"' for name in tables if name.isidentifier())
    if names:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f"VACUUM (SKIP_LOCKED) {names}"))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.partition("\n")[0] or type(exc).__name__


def retry_on_disconnect(
    operation: Callable[[], T],
    *,
    what: str,
    give_up_after: float | None = 30.0,
    first_delay: float = 0.05,
    max_delay: float = 2.0,
    log_every: int = 10,
    quiet: bool = False,
    extra: Mapping[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `operation` until it completes, retrying with capped exponential backoff on connection errors only.

    `give_up_after`: seconds after which the last connection error is raised (None: retry as long as this
    process lives). The first failure and every `log_every`-th one are logged as one WARNING line each, and
    so is a success after failures; `quiet` leaves the failures to a caller that calls again in a loop.
    """
    started = time.monotonic()
    delay = first_delay
    failures = 0
    while True:
        try:
            result = operation()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            failures += 1
            elapsed = time.monotonic() - started
            if give_up_after is not None and elapsed + delay > give_up_after:
                if not quiet:
                    log.warning("%s: database connection lost, giving up after %d tries in %.1fs: %s",
                                what, failures, elapsed, first_line(exc), extra=dict(extra or {}))
                raise
            if not quiet and (failures == 1 or failures % log_every == 0):
                log.warning("%s: database connection lost (try %d, retrying with backoff): %s",
                            what, failures, first_line(exc), extra=dict(extra or {}))
            sleep(delay * random.uniform(0.5, 1.0))  # jitter: many workers reconnect at once after a restart
            delay = min(max_delay, delay * 2)
            continue
        if failures:
            log.warning("%s: succeeded after %d failed tries (%.1fs)", what, failures, time.monotonic() - started,
                        extra=dict(extra or {}))
        return result


# Set by `retried_on_disconnect()`: the transactions opened meanwhile are retried by their caller.
_RETRIED_ON_DISCONNECT: ContextVar[bool] = ContextVar("jobservice_retried_on_disconnect", default=False)


@contextmanager
def retried_on_disconnect() -> Iterator[None]:
    """Declares that the caller retries the transactions it opens inside this block when a connection error
    meets them before their COMMIT (nothing was committed then): a Database built with `retried_ping_idle_after`
    skips the pre-ping of a connection in use a moment ago for them. Per thread / greenlet (a context variable)."""
    token = _RETRIED_ON_DISCONNECT.set(True)
    try:
        yield
    finally:
        _RETRIED_ON_DISCONNECT.reset(token)


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, application_name: str = "jobservice",
                 ping_idle_after: float | None = None, retried_ping_idle_after: float | None = None) -> None:
        """`application_name` names this process's sessions in pg_stat_activity (operators and tests target them).

        `ping_idle_after`: test a pooled connection before use only when it sat idle this many seconds (default: every
        checkout, a round trip before every transaction). Only for callers whose every transaction is retried on a
        connection error (Database.retrying): a connection that died while briefly idle fails its statement, and the
        retry runs on a fresh one.

        `retried_ping_idle_after`: the same, but only inside `retried_on_disconnect()` blocks; every other checkout
        is pinged (for a process, the API, where only some transactions are retried: its submits).
        """
        self.url = url
        self.application_name = application_name[:63]
        self.engine: Engine = create_engine(
            sqlalchemy_url(url), pool_pre_ping=ping_idle_after is None and retried_ping_idle_after is None,
            pool_size=pool_size, max_overflow=pool_size * 2,
            # JIT off for every session: this service's statements are short, and one whose estimate passes
            # jit_above_cost paid LLVM compilation at every execution (psycopg2 prepares nothing): the scheduler's
            # backlog-heads query, 15 ms of index probes at 100,000 pending, took 250 ms of JIT per pass.
            connect_args={"application_name": self.application_name, "options": "-c jit=off"},
        )
        _autocommit_without_set(self.engine)
        if ping_idle_after is not None:
            _ping_when_idle(self.engine, ping_idle_after, always_retried=True)
        elif retried_ping_idle_after is not None:
            _ping_when_idle(self.engine, retried_ping_idle_after, always_retried=False)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self.sessions()
        try:
            yield session
        finally:
            session.close()

    def retrying(self, work: Callable[[Session], T], *, what: str, **options: Any) -> T:
        """`work` in a fresh session per try, retried on connection errors (see retry_on_disconnect).
        `work` must be idempotent: a try whose commit was acknowledged by nobody may have committed."""

        def once() -> T:
            with self.session() as session:
                return work(session)

        return retry_on_disconnect(once, what=what, **options)

    def dispose(self) -> None:
        self.engine.dispose()


def _autocommit_without_set(engine: Engine) -> None:
    """Switch a connection into autocommit and back with psycopg2's `autocommit` attribute alone.

    SQLAlchemy's psycopg2 dialect switches with `set_isolation_level()`: psycopg2 then sends `SET
    default_transaction_isolation TO DEFAULT` before the connection's next statement, a round trip of its own, and
    starts the transactions after it with `BEGIN ISOLATION LEVEL READ COMMITTED`. So every one-statement transaction in
    autocommit (a worker's claim and end: autocommit_connection) cost two round trips, and the pool's reset of it one
    more statement for the server. Only the switch to and from autocommit is done so, and only outside a transaction
    (psycopg2 refuses the attribute inside one, where the dialect's way rolls it back) and while the connection keeps
    the server's default isolation (psycopg2's `isolation_level` is None): anything else goes the dialect's way."""
    dialect = engine.dialect
    set_by_dialect = dialect.set_isolation_level

    def set_isolation_level(dbapi_connection: Any, level: str) -> None:
        if dbapi_connection.status == psycopg2.extensions.STATUS_READY and dbapi_connection.isolation_level is None:
            if level == "AUTOCOMMIT":
                dbapi_connection.autocommit = True
                return
            if level == dialect.default_isolation_level:
                dbapi_connection.autocommit = False
                return
        set_by_dialect(dbapi_connection, level)

    dialect.set_isolation_level = set_isolation_level  # type: ignore[method-assign]


def _ping_when_idle(engine: Engine, idle_seconds: float, *, always_retried: bool) -> None:
    """The pool's pre-ping, for connections idle at least `idle_seconds` only (SQLAlchemy's custom pessimistic
    disconnect handling: DisconnectionError from a checkout makes the pool replace the connection and try again).
    Unless `always_retried`, that holds inside `retried_on_disconnect()` only, and every other checkout is pinged."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None:
            return  # just connected
        if (always_retried or _RETRIED_ON_DISCONNECT.get()) and time.monotonic() - idle_since < idle_seconds:
            return  # in use a moment ago, and its caller retries a transaction that meets a dead connection
        try:
            engine.dialect.do_ping(dbapi_connection)  # as pool_pre_ping does: autocommit, no transaction left open
        except psycopg2.Error as exc:
            raise sa_exc.DisconnectionError(first_line(exc)) from exc


def autocommit_connection(session: Session) -> Connection:
    """The session's connection in autocommit, for a transaction of one statement (its own transaction then): one
    round trip, where BEGIN, the statement and COMMIT are three. A session already in a transaction (a caller that
    wrote before) keeps it: the statement joins it. The connection's isolation is restored when the session's
    transaction ends (it goes back to the pool)."""
    if session.in_transaction():
        return session.connection()
    return session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


@contextmanager
def transaction(session: Session) -> Iterator[Session]:
    """One unit of work: commits when the block ends, rolls back when it raises."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
