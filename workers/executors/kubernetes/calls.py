"""API calls: retry what is transient (429, 5xx, broken connections), honouring Retry-After; fail fast on the rest."""
from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import urllib3
from kubernetes.client import ApiException



log = logging.getLogger(__name__)


T = TypeVar("T")

REQUEST_TIMEOUT = (10.0, 30.0)  # (connect, read) for ordinary calls

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ApiException):
        return error.status in TRANSIENT_STATUSES
    return isinstance(error, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def retry_after_seconds(error: BaseException) -> float | None:
    headers = getattr(error, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP-date: rare from the API server; the backoff applies


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, error: BaseException) -> float:
        asked = retry_after_seconds(error)
        if asked is not None:
            return min(asked, self.max_delay)
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return backoff * (0.5 + random.random() / 2)  # jitter, so many workers do not retry in step

    def call(self, what: str, action: Callable[[], T]) -> T:
        for attempt in itertools.count(1):
            try:
                return action()
            except Exception as error:
                if attempt >= self.attempts or not is_transient(error):
                    raise
                wait = self.delay(attempt, error)
                log.warning("%s failed (%s); retry %d of %d in %.1fs", what, _describe(error), attempt,
                            self.attempts - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


def _describe(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)
