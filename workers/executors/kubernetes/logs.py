"""Logs: follow each member's container, resume after the last line delivered."""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client import ApiClient, ApiException

from workers.executors.base import LogLine
from workers.executors.kubernetes.calls import REQUEST_TIMEOUT, _describe, is_transient
from workers.executors.kubernetes.manifest import CONTAINER

log = logging.getLogger(__name__)


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_log_timestamp(stamp: str) -> tuple[int, datetime] | None:
    """An RFC3339Nano stamp as (nanoseconds since the epoch, for ordering; a datetime, microsecond precision)."""
    match = _STAMP.match(stamp)
    if not match:
        return None
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    base = datetime.fromisoformat(match.group(1) + zone)
    nanos = int((match.group(2) or "0").ljust(9, "0"))
    return int(base.timestamp()) * 1_000_000_000 + nanos, (base + timedelta(microseconds=nanos // 1000)).astimezone(UTC)


def _since_time(key: int) -> str:
    # The API server passes sinceTime on to the kubelet at second precision: ask from the start of that
    # second and drop what was already delivered.
    return datetime.fromtimestamp(key // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _LogFollower:
    """Streams one pod's container log (follow, timestamps) into `emit`, reconnecting without losing or
    repeating lines: after a break it asks for the log since the last timestamp's second and skips the
    lines it already delivered (older stamps, and as many equal stamps as it has seen)."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        pod: str,
        member: int,
        emit: Callable[[list[LogLine]], None],
        finished: Callable[[], bool],
        since: datetime | None = None,
        idle_timeout: float = 60.0,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._api = api_client
        self._on_exit = on_exit  # told when the stream is done for good (the attempt's last lines are in)
        self._namespace = namespace
        self._pod = pod
        self._member = member
        self._emit = emit
        self._finished = finished
        self._idle_timeout = idle_timeout
        self._stop = threading.Event()
        self._response: Any = None
        self._last_key: int | None = None
        self._seen_at_last = 0
        self._skip = 0
        if since is not None:
            # Lines up to `since` are already stored (microsecond precision there: cover the rest of it).
            stamp = int(since.timestamp()) * 1_000_000_000 + since.microsecond * 1000 + 999
            self._last_key, self._seen_at_last = stamp, 0
        self.connects = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"logs-{pod}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._done

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # unblocks a read waiting on a quiet stream
            except Exception:  # noqa: BLE001 - best effort; the read timeout ends it anyway
                pass

    def _open(self) -> Any:
        # The generated read_namespaced_pod_log has no since_time (the OpenAPI spec omits it, though the API
        # accepts it as PodLogOptions.sinceTime), so the request is built with the client's own serializer.
        query: list[tuple[str, Any]] = [("container", CONTAINER), ("follow", True), ("timestamps", True)]
        if self._last_key is not None:
            query.append(("sinceTime", _since_time(self._last_key)))
        method, url, headers, _, _ = self._api.param_serialize(
            method="GET",
            resource_path="/api/v1/namespaces/{namespace}/pods/{name}/log",
            path_params={"namespace": self._namespace, "name": self._pod},
            query_params=query,
            # The API server negotiates pods/log like any endpoint: only JSON, YAML or protobuf (or */*) are
            # acceptable in Accept, whatever the body; text/plain gets 406. The official client sends JSON.
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        answer = self._api.call_api(method, url, header_params=headers,
                                    _request_timeout=(REQUEST_TIMEOUT[0], self._idle_timeout))
        if not 200 <= answer.status <= 299:
            answer.read()
            raise ApiException.from_response(http_resp=answer, body=None, data=None)
        self.connects += 1
        return answer.response

    def _run(self) -> None:
        try:
            self._follow()
        finally:
            self._done = True  # before telling: whoever is told must see it finished
            if self._on_exit is not None:
                self._on_exit()

    def _follow(self) -> None:
        failures = 0
        while not self._stop.is_set():
            done_before = self._finished()  # a read that starts after the container ended gets all of it
            try:
                self._response = self._open()
                self._skip = self._seen_at_last
                try:
                    self._consume(self._response, complete=done_before)
                finally:
                    self._response.release_conn()
                    self._response = None
                failures = 0
            except ApiException as error:
                if error.status == 404:
                    return  # the pod is gone, and its log with it
                if error.status != 400 and not is_transient(error):
                    log.warning("logs of pod %s: %s", self._pod, _describe(error))
                    return
                failures += 1  # 400: the container is not running yet
            except Exception as error:
                if self._stop.is_set():
                    return
                failures += 1
                log.info("logs of pod %s broke (%s); reconnecting", self._pod, _describe(error))
            if done_before or self._stop.is_set():
                return
            self._stop.wait(min(5.0, 0.05 * 2 ** min(failures, 7)))

    def _consume(self, response: Any, complete: bool) -> None:
        pending = b""
        for chunk in response.stream(2**16, decode_content=True):
            if self._stop.is_set():
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            self._deliver(lines)
        if pending and complete:  # a last line without a newline; on a broken stream it comes again whole
            self._deliver([pending])

    def _deliver(self, raw_lines: Iterable[bytes]) -> None:
        batch: list[LogLine] = []
        for raw in raw_lines:
            text = raw.decode("utf-8", errors="replace").rstrip("\r")
            stamp, _, line = text.partition(" ")
            parsed = parse_log_timestamp(stamp)
            if parsed is None:  # not stamped: keep it, stamped now
                batch.append(LogLine(at=datetime.now(UTC), stream="stdout", line=text, member=self._member))
                continue
            key, at = parsed
            if self._last_key is not None and key < self._last_key:
                continue
            if key == self._last_key:
                if self._skip > 0:
                    self._skip -= 1
                    continue
                self._seen_at_last += 1
            else:
                self._last_key, self._seen_at_last, self._skip = key, 1, 0
            # The kubelet merges stdout and stderr into one stream; which one a line came from is lost.
            batch.append(LogLine(at=at, stream="stdout", line=line, member=self._member))
        if batch:
            self._emit(batch)
