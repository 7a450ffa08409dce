"""The per-attempt log budget the runner wraps around every executor's log sink."""
from __future__ import annotations

from datetime import datetime, timezone

from app.db import Database
from app.domain import logs as log_store
from app.models import Job
from config import Settings
from workers.executors.base import LogLine
from workers.log_budget import LogBudget


def line(text: str, member: int = 0) -> LogLine:
    return LogLine(datetime.now(timezone.utc), "stdout", text, member)


def budget(used_lines: int = 0, used_bytes: int = 0, **limits: str) -> tuple[LogBudget, list[LogLine]]:
    stored: list[LogLine] = []
    env = {"LOG_MAX_LINES_PER_ATTEMPT": "5", "LOG_MAX_BYTES_PER_ATTEMPT": "1000", **limits}
    return LogBudget(stored.extend, Settings.from_env(env), used_lines, used_bytes), stored


def test_lines_past_the_cap_are_dropped_and_counted_in_one_final_line() -> None:
    sink, stored = budget()
    sink([line(f"l{i}") for i in range(4)])
    sink([line("l4"), line("l5"), line("l6")])
    sink([line("x")])  # a short line after the cap is dropped too: the log stays a prefix
    assert [l.line for l in stored] == ["l0", "l1", "l2", "l3", "l4"]
    sink.close()
    sink.close()  # once
    assert stored[-1].stream == log_store.SYSTEM_STREAM and len(stored) == 6
    assert stored[-1].line.startswith("[log truncated: 3 more lines (5 bytes) were dropped;")


def test_bytes_past_the_cap_are_dropped() -> None:
    sink, stored = budget(LOG_MAX_LINES_PER_ATTEMPT="100", LOG_MAX_BYTES_PER_ATTEMPT="10")
    sink([line("aaaa"), line("bbbb"), line("cccc"), line("dd")])
    sink.close()
    assert [l.line for l in stored[:-1]] == ["aaaa", "bbbb"]
    assert "2 more lines (6 bytes)" in stored[-1].line


def test_nothing_is_said_when_nothing_was_dropped() -> None:
    sink, stored = budget()
    sink([line("only")])
    sink.close()
    assert [l.line for l in stored] == ["only"]


def test_a_long_line_is_cut_and_says_so() -> None:
    sink, stored = budget(LOG_MAX_LINE_BYTES="100", LOG_MAX_LINES_PER_ATTEMPT="10", LOG_MAX_BYTES_PER_ATTEMPT="100000")
    sink([line("é" * 1000)])  # 2,000 bytes of UTF-8: cut on a character boundary
    (cut,) = stored
    assert len(cut.line.encode()) <= 100 and cut.line.startswith("é" * 30) and "more bytes]" in cut.line


def test_a_readopted_attempt_continues_its_budget() -> None:
    sink, stored = budget(used_lines=5)
    sink([line("late")])
    sink.close()
    assert len(stored) == 1 and "1 more lines" in stored[0].line


def test_a_retry_starts_with_a_marker_line() -> None:
    stored: list[LogLine] = []
    LogBudget.start(stored.extend, Settings(), attempt=0)
    assert stored == []
    LogBudget.start(stored.extend, Settings(), attempt=2)([line("hello")])
    assert [l.line for l in stored] == [log_store.attempt_marker(2), "hello"]


def test_attempt_usage_counts_what_an_attempt_stored(database: Database) -> None:
    now = datetime.now(timezone.utc)
    with database.session() as s:
        s.add(Job(id="job-usage", owner="t", job_type="t", priority=1, status="running", queue="default"))
        s.commit()
        log_store.append(s, "job-usage", 1, [(now, "stdout", 0, "abc"), (now, "stdout", 0, "é")])
        log_store.append(s, "job-usage", 0, [(now, "stdout", 0, "older attempt")])
        assert log_store.attempt_usage(s, "job-usage", 1) == (2, 5)
        assert log_store.attempt_usage(s, "job-usage", 7) == (0, 0)


def test_a_full_log_is_drained_in_bulk_and_every_dropped_line_counted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_local_executor import run_until_end, spec
    from workers.executors.local import LocalExecutor

    stored: list[LogLine] = []
    sink = LogBudget(stored.extend, Settings.from_env({"LOG_MAX_LINES_PER_ATTEMPT": "10"}))
    execution = LocalExecutor(tmp_path, kill_grace_seconds=1).launch(spec(["sh", "-c", "yes | head -n 300000; printf end"]), sink)
    run_until_end(execution)
    sink.close()
    assert len(stored) == 11 and stored[-1].line.startswith("[log truncated: 299991 more lines (299993 bytes) were dropped;")
