"""Watching: list, then watch from the list's version; resume; relist on 410."""
from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from kubernetes import watch
from kubernetes.client import ApiException


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


class _Reflector:
    """Keeps a watch open over one selection and hands every change to `on_event`.

    A watch ends (server timeout, load balancer, API server restart): it is resumed from the last
    resourceVersion seen. If that version is too old (410 Gone / Expired), the selection is listed again
    (`on_sync` gets the full current state and its resourceVersion) and watched from the list's resourceVersion.
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
    ) -> None:
        self._list_call = list_call
        self._namespace = namespace
        self._selectors = selectors
        self._on_sync = on_sync
        self._on_event = on_event
        self._timeout = timeout_seconds
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self.lists = 0
        self.resumes = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        _running.add(self)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        current = self._watch
        if current is not None:
            current.stop()

    def _run(self) -> None:
        version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = self._list_call(self._namespace, **self._selectors, _request_timeout=REQUEST_TIMEOUT)
                    version = listed.metadata.resource_version
                    self.lists += 1
                    self._on_sync(list(listed.items or []), version)
                else:
                    self.resumes += 1
                self._watch = watch.Watch()
                # timeout_seconds also makes Watch.stream raise on 410 instead of retrying with the same version.
                for event in self._watch.stream(
                    self._list_call,
                    self._namespace,
                    **self._selectors,
                    resource_version=version,
                    timeout_seconds=self._timeout,
                    allow_watch_bookmarks=True,
                    _request_timeout=(REQUEST_TIMEOUT[0], self._timeout + 30),
                ):
                    if self._stop.is_set():
                        break
                    if event["type"] == "BOOKMARK":
                        version = event["raw_object"]["metadata"]["resourceVersion"]
                        continue
                    version = event["object"].metadata.resource_version
                    self._on_event(event["type"], event["object"])
                failures = 0
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
            finally:
                self._watch = None
            if failures:
                self._stop.wait(min(30.0, 0.2 * 2 ** min(failures, 8)))
