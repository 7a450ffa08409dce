"""What people read: rich tables and key/value panels on stdout, notes and errors on stderr."""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

STATUS_STYLES = {
    "pending": "yellow",
    "queued": "cyan",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}

# A table piped to a file or another program keeps whole rows (no wrapping at 80 columns), for grep and awk.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def status(value: str | None) -> Text:
    return Text(value or "-", style=STATUS_STYLES.get(value or "", ""))


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def moment(value: str | None) -> str:
    """`2026-11-27 15:38:38` (UTC, to the second): an API timestamp made short enough for a table."""
    parsed = parse_time(value)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if parsed else "-"


def age(value: str | None, now: datetime | None = None) -> str:
    """`42s`, `5m`, `3h`, `2d` since the given time."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    seconds = max(0.0, ((now or datetime.now(timezone.utc)) - moment).total_seconds())
    return duration(seconds)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def dump_json(value: Any) -> None:
    # Plain print: JSON for programs carries no markup or colour.
    print(json.dumps(value, indent=2, sort_keys=False))


def table(*columns: str, title: str | None = None) -> Table:
    grid = Table(title=title, box=None, header_style="bold", pad_edge=False, title_justify="left")
    for column in columns:
        grid.add_column(column, no_wrap=column in ("ID", "JOB", "NAME", "NODE"))
    return grid


def fields(pairs: list[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in pairs:
        if value is None or value == "" or value == {}:
            continue
        grid.add_row(name, value if isinstance(value, Text) else str(value))
    return grid


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def generic(document: Any, title: str | None = None) -> None:
    """A body whose shape this client does not know (yet): lists of objects as tables, the rest as fields."""
    if isinstance(document, list) and document and all(isinstance(row, dict) for row in document):
        columns = list(dict.fromkeys(key for row in document for key in row))
        grid = table(*(c.upper() for c in columns), title=title)
        for row in document:
            grid.add_row(*(cell(row.get(c)) for c in columns))
        out.print(grid)
        return
    if not isinstance(document, dict):
        out.print(cell(document))
        return
    scalars = [(key, cell(value)) for key, value in document.items() if not _is_rows(value)]
    if scalars:
        out.print(fields(scalars))
    for key, value in document.items():
        if _is_rows(value):
            generic(value, title=key)


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(row, dict) for row in value)
