"""A log sink with a budget per attempt, wrapped around the runner's LogWriter for every executor alike.

Past `LOG_MAX_LINES_PER_ATTEMPT` lines or `LOG_MAX_BYTES_PER_ATTEMPT` bytes the rest of the attempt's
output is dropped and counted; when the attempt ends, one line says how much was dropped. A line longer
than `LOG_MAX_LINE_BYTES` is cut. A retry's log starts with a marker line, so that one job's attempts
can be told apart in its log.
"""
from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timezone

from app.domain import logs as log_store
from config import Settings
from workers.executors.base import LogLine, LogSink

CUT_NOTE_BYTES = 40


class LogBudget:
    def __init__(self, sink: LogSink, settings: Settings, used_lines: int = 0, used_bytes: int = 0) -> None:
        """`used_*`: what the attempt stored already (a re-adopted execution does not start a fresh budget)."""
        self.sink = sink
        self.max_lines = settings.log_max_lines_per_attempt
        self.max_bytes = settings.log_max_bytes_per_attempt
        self.max_line_bytes = settings.log_max_line_bytes
        self.lines = used_lines
        self.bytes = used_bytes
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def start(cls, sink: LogSink, settings: Settings, attempt: int) -> "LogBudget":
        """The budget of an attempt that starts now; a retry's first line marks where it begins."""
        if attempt > 0:
            sink([LogLine(datetime.now(timezone.utc), log_store.SYSTEM_STREAM, log_store.attempt_marker(attempt))])
        return cls(sink, settings)

    @property
    def truncated(self) -> bool:
        return self.dropped_lines > 0

    @property
    def full(self) -> bool:
        """Everything from now on is dropped: a reader may count what it drops (`dropped`) without sending it."""
        return self.truncated or self._closed

    def dropped(self, lines: int, size: int) -> None:
        with self._lock:
            self.dropped_lines += lines
            self.dropped_bytes += size

    def __call__(self, lines: list[LogLine]) -> None:
        kept: list[LogLine] = []
        with self._lock:
            for line in lines:
                raw = line.line.encode("utf-8", errors="replace")
                if len(raw) > self.max_line_bytes:
                    keep = max(0, self.max_line_bytes - CUT_NOTE_BYTES)  # the note fits within the cap
                    text = raw[:keep].decode("utf-8", errors="ignore")
                    line = dataclasses.replace(line, line=f"{text} [line cut: {len(raw) - keep} more bytes]")
                    size = len(line.line.encode())
                else:
                    size = len(raw)
                # Once over the budget everything else is dropped, short lines too: the log stays a prefix.
                if self._closed or self.truncated or self.lines + 1 > self.max_lines or self.bytes + size > self.max_bytes:
                    self.dropped_lines += 1
                    self.dropped_bytes += len(raw)
                    continue
                self.lines += 1
                self.bytes += size
                kept.append(line)
        if kept:
            self.sink(kept)

    def close(self) -> None:
        """The attempt has ended (its output readers are done): say what was dropped, once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.truncated:
                return
            note = (
                f"[log truncated: {self.dropped_lines} more lines ({self.dropped_bytes} bytes) were dropped; "
                f"an attempt keeps at most {self.max_lines} lines and {self.max_bytes} bytes]"
            )
        self.sink([LogLine(datetime.now(timezone.utc), log_store.SYSTEM_STREAM, note)])
