"""Exit codes scripts can rely on (README: "The CLI")."""
from __future__ import annotations

OK = 0  # done; `submit --wait` / `wait`: the job succeeded
JOB_FAILED = 1  # `submit --wait` / `wait`: the job failed
USAGE = 2  # bad flags or job file (click's own code for usage errors)
JOB_CANCELLED = 3  # `submit --wait` / `wait`: the job was cancelled
REFUSED = 4  # the service refused the request: invalid (400), not found (404), conflict (409), too large (413)
AUTH = 5  # no token, an invalid one (401) or one without the scope (403)
UNAVAILABLE = 6  # service unreachable, rate limited (429), or its error (5xx)
TIMEOUT = 124  # `--timeout` of a wait ran out (the job goes on), as timeout(1)
INTERRUPTED = 130  # Ctrl-C (the job goes on)

BY_OUTCOME = {"succeeded": OK, "failed": JOB_FAILED, "cancelled": JOB_CANCELLED}


def for_status(status: int | None) -> int:
    if status in (401, 403):
        return AUTH
    if status is None or status == 429 or status >= 500:
        return UNAVAILABLE
    return REFUSED
