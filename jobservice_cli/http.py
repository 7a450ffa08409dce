"""The Job Service's REST API over HTTP (httpx): JSON calls, plain-text logs and resumable SSE streams.

No Flask, no database: this is what a user's laptop runs against a remote service.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from jobservice_cli import exits

API_PREFIX = "/api/v1"
# Reads wait this long; a follow stream sends a keep-alive every STREAM_KEEPALIVE_SECONDS (15 s by default).
READ_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_SECONDS = 10.0
# A follow stream that drops is resumed from its last event id; this many failures in a row give up.
STREAM_RECONNECTS = 5
QUICK_CLOSE_SECONDS = 1.0


@dataclass
class ApiError(Exception):
    """An answer in the service's error envelope (or a failure to get one), with the exit code it maps to."""

    status: int | None
    code: str
    message: str
    details: list[dict[str, str]] = field(default_factory=list)
    request_id: str | None = None

    @property
    def exit_code(self) -> int:
        return exits.for_status(self.status)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Event:
    """One server-sent event: `event` is `message` for rows and `end` for the last one (data: the job's status)."""

    event: str
    id: str | None
    data: str


def normalize_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/api/v1` all name the same service."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url[: -len(API_PREFIX)] if url.endswith(API_PREFIX) else url


class Client:
    def __init__(self, url: str, token: str | None, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Accept": "application/json", "User-Agent": "jobservice-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = normalize_url(url)
        self.http = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            headers=headers,
            timeout=httpx.Timeout(READ_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    # --- plain calls -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(None, "UNREACHABLE", f"cannot reach {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=_params(params)).json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body).json()

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path).json()

    def text(self, path: str, **params: Any) -> str:
        return self.request("GET", path, params=_params(params), headers={"Accept": "text/plain"}).text

    # --- follow streams --------------------------------------------------------------------------------

    def stream(self, path: str, **params: Any) -> Iterator[Event]:
        """Events of a `follow=true` stream until its `end` event, resuming with Last-Event-ID when the
        connection drops or the server closes it (STREAM_MAX_SECONDS)."""
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            opened, got_any = time.monotonic(), False
            try:
                with self.http.stream("GET", path, params=_params({**params, "follow": True}), headers=headers) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    for event in _parse_sse(response.iter_lines()):
                        failures, got_any = 0, True
                        if event.id is not None:
                            last_id = event.id
                        yield event
                        if event.event == "end":
                            return
            except httpx.TransportError as exc:
                problem: Exception | str = exc
            else:
                # The server closed the stream without `event: end` (its time limit, a restart): resume at
                # once, unless it keeps closing streams as soon as they open.
                if got_any or time.monotonic() - opened >= QUICK_CLOSE_SECONDS:
                    continue
                problem = "closed at once"
            failures += 1
            if failures > STREAM_RECONNECTS:
                raise ApiError(None, "UNREACHABLE", f"stream from {self.base_url} lost: {problem}")
            time.sleep(min(2.0 ** failures / 4, 5.0))


def _params(params: dict[str, Any]) -> dict[str, Any]:
    """Query parameters as the API reads them: booleans as `true`/`false`, no unset ones."""
    return {k: ("true" if v else "false") if isinstance(v, bool) else v for k, v in params.items() if v is not None}


def _error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(
            response.status_code, str(error.get("code", response.status_code)), str(error.get("message", "")),
            list(error.get("details") or []), error.get("request_id"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(response.status_code, f"HTTP_{response.status_code}", response.text[:500].strip() or response.reason_phrase)


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    event, event_id, data = "message", None, []
    for line in lines:
        if not line:
            if data or event != "message":
                yield Event(event, event_id, "\n".join(data))
            event, event_id, data = "message", None, []
        elif line.startswith(":"):
            continue  # `: open`, `: keep-alive`
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            elif name == "event":
                event = value
