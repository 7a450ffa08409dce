"""Watching: list, then watch from the list's version; resume; relist on 410."""
from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiException
from kubernetes.watch.watch import iter_resp_lines


from workers.executors.kubernetes.calls import REQUEST_TIMEOUT, _describe

log = logging.getLogger(__name__)
_running: "weakref.WeakSet[_Reflector]" = weakref.WeakSet()
EXIT_JOIN_SECONDS = 2.0


@atexit.register
def _stop_running_reflectors() -> None:
    """A watch thread still logging while the interpreter finalizes aborts the process (its stderr lock is
    taken away mid-write): stop every watch, then give the threads a moment to leave."""
    reflectors = list(_running)
    for reflector in reflectors:
        reflector.stop()
    deadline = time.monotonic() + EXIT_JOIN_SECONDS
    for reflector in reflectors:
        reflector._thread.join(max(0.0, deadline - time.monotonic()))


def list_raw(list_call: Callable[..., Any], namespace: str, decode: Callable[[dict[str, Any]], Any],
             **selectors: Any) -> tuple[list[Any], str | None]:
    """A list call's items, each read from the API's JSON by `decode`, and the list's resourceVersion. The
    client's own decoding (into its models) costs far more CPU and memory than the few fields read."""
    response = list_call(namespace, **selectors, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
    try:
        body = response.data
    except BaseException:
        response.close()
        raise
    finally:
        response.release_conn()
    listed = json.loads(body)
    return [decode(item) for item in listed.get("items") or []], (listed.get("metadata") or {}).get("resourceVersion")


class _Expired(Exception):
    """The watch's resourceVersion is older than what the API server keeps (410): list again."""


class _Reflector:
    """Keeps a watch open over one selection and hands every change to `on_event`.

    A watch ends (server timeout, load balancer, API server restart): it is resumed from the last
    resourceVersion seen. If that version is too old (410 Gone / Expired), the selection is listed again
    (`on_sync` gets the full current state and its resourceVersion) and watched from the list's resourceVersion.
    Objects reach the handlers as `decode` makes them from the API's JSON (see `records`).
    """

    def __init__(
        self,
        name: str,
        list_call: Callable[..., Any],
        namespace: str,
        selectors: dict[str, str],
        on_sync: Callable[[list[Any], str | None], None],
        on_event: Callable[[str, Any], None],
        timeout_seconds: int,
        decode: Callable[[dict[str, Any]], Any],
    ) -> None:
        self._list_call = list_call
        self._namespace = namespace
        self._selectors = selectors
        self._on_sync = on_sync
        self._on_event = on_event
        self._timeout = timeout_seconds
        self._decode = decode
        self._stop = threading.Event()
        self._response: Any = None
        self.lists = 0
        self.resumes = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        _running.add(self)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # unblocks a read waiting on a quiet watch
            except Exception:  # noqa: BLE001 - best effort; the read timeout ends it anyway
                pass

    def _run(self) -> None:
        version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    items, version = list_raw(self._list_call, self._namespace, self._decode, **self._selectors)
                    self.lists += 1
                    self._on_sync(items, version)
                else:
                    self.resumes += 1
                version = self._watch(version)
                failures = 0
            except _Expired:
                log.info("watch %s: resourceVersion %s expired; relisting", self._thread.name, version)
                version = None
                continue
            except ApiException as error:
                if error.status == 410:
                    log.info("watch %s: resourceVersion %s expired; relisting", self._thread.name, version)
                    version = None
                    continue
                failures += 1
                log.warning("watch %s failed: %s", self._thread.name, _describe(error))
            except Exception as error:  # connection trouble, or our own stop() cutting the socket
                if self._stop.is_set():
                    return
                failures += 1
                log.warning("watch %s broke: %s", self._thread.name, _describe(error))
            if failures:
                self._stop.wait(min(30.0, 0.2 * 2 ** min(failures, 8)))

    def _watch(self, version: str | None) -> str | None:
        """One watch from `version` until the server ends it; returns the last version seen."""
        response = self._list_call(
            self._namespace,
            **self._selectors,
            watch=True,
            resource_version=version,
            timeout_seconds=self._timeout,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(REQUEST_TIMEOUT[0], self._timeout + 30),
        )
        self._response = response
        complete = False
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    # A Status: 410 when the version has been compacted away, else the API's refusal.
                    if obj.get("code") == 410:
                        raise _Expired()
                    raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind != "BOOKMARK":
                    self._on_event(kind, self._decode(obj))
            else:
                complete = True  # the server ended the stream: the connection is clean for the next request
        finally:
            self._response = None
            if not complete:
                response.close()  # unread events would be the next request's answer on a reused connection
            response.release_conn()
        return version
