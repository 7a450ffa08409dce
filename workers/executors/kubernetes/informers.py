"""Shared informers: one list + watch per resource type (Jobs, pods) per executor, i.e. per cluster per worker
process, label-selected to this service's objects, with a local cache that feeds every running attempt.

The shape of client-go's `tools/cache` shared informer: a reflector (watches.py) keeps the cache current,
resumes its watch, relists on 410; handlers are keyed by owner (job id label, attempt label), so an
attempt's cost is a dictionary entry, not a connection. The API server sees two watches per cluster,
whatever the number of running jobs. The cache holds slim records (`records`) read from the API's JSON, not
the client's models, and is indexed by owner, so that an attempt that subscribes costs no scan of it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.executors.kubernetes.manifest import LABEL_ATTEMPT, LABEL_JOB_ID, LABEL_MANAGED_BY, MANAGER
from workers.executors.kubernetes.records import Meta
from workers.executors.kubernetes.watches import _Reflector

Key = tuple[str, str]  # (job id label value, attempt label value)


def owner_key(obj: Any) -> Key | None:
    if isinstance(obj.metadata, Meta):
        return obj.metadata.owner
    labels = obj.metadata.labels or {}
    if LABEL_JOB_ID not in labels or LABEL_ATTEMPT not in labels:
        return None
    return labels[LABEL_JOB_ID], labels[LABEL_ATTEMPT]


def version_at_least(current: str | None, needed: str | None) -> bool:
    """Whether a cache at resourceVersion `current` must already hold what was written at `needed`.
    resourceVersions are opaque to clients; compared only when both are integers (etcd revisions), else no."""
    return bool(current and needed and current.isdigit() and needed.isdigit() and int(current) >= int(needed))


@dataclass
class _Handler:
    on_sync: Callable[[list[Any], str | None], None]  # the owner's objects as of the cache's resourceVersion
    on_event: Callable[[str, Any], None]


class SharedInformer:
    """The cache of one resource type in a namespace, and the handlers of the attempts that watch it."""

    def __init__(self, name: str, list_call: Callable[..., Any], namespace: str, timeout_seconds: int,
                 decode: Callable[[dict[str, Any]], Any]) -> None:
        """`decode` makes the cached record of an object from the API's JSON (`records.Job`, `records.Pod`)."""
        self.name = name
        self._lock = threading.Lock()  # held while handlers run: each sees the cache's changes in order
        self._cache: dict[str, Any] = {}
        # The cache again, by owner: an attempt that subscribes gets its objects without a scan of the
        # whole cache (which made each launch O(running jobs)).
        self._by_owner: dict[Key, dict[str, Any]] = {}
        self._version: str | None = None
        self._synced = False
        self._handlers: dict[Key, dict[object, _Handler]] = {}  # an attempt watched twice (a redelivery) has two
        self._reflector = _Reflector(name, list_call, namespace, {"label_selector": f"{LABEL_MANAGED_BY}={MANAGER}"},
                                     self._sync, self._event, timeout_seconds, decode)
        self._started = False

    @property
    def lists(self) -> int:
        return self._reflector.lists

    @property
    def resumes(self) -> int:
        return self._reflector.resumes

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def watched(self) -> int:
        """Attempts with a handler here."""
        with self._lock:
            return len(self._handlers)

    def subscribe(self, key: Key, token: object, on_sync: Callable[[list[Any], str | None], None],
                  on_event: Callable[[str, Any], None]) -> None:
        """Handle the objects of `key` from now on; once the cache has listed, `on_sync` gets them at once."""
        with self._lock:
            self._handlers.setdefault(key, {})[token] = _Handler(on_sync, on_event)
            if not self._started:
                self._started = True
                self._reflector.start()
            if self._synced:
                on_sync(list(self._by_owner.get(key, {}).values()), self._version)

    def unsubscribe(self, key: Key, token: object) -> None:
        with self._lock:
            handlers = self._handlers.get(key, {})
            handlers.pop(token, None)
            if not handlers:
                self._handlers.pop(key, None)

    def stop(self) -> None:
        self._reflector.stop()

    def _sync(self, items: list[Any], version: str | None) -> None:
        with self._lock:
            self._cache, self._by_owner = {}, {}
            for obj in items:
                self._put(obj)
            self._version = version
            self._synced = True
            for key, handlers in self._handlers.items():
                objs = list(self._by_owner.get(key, {}).values())
                for handler in list(handlers.values()):
                    handler.on_sync(objs, version)

    def _put(self, obj: Any) -> None:
        name = obj.metadata.name
        self._drop(name)
        self._cache[name] = obj
        key = owner_key(obj)
        if key is not None:
            self._by_owner.setdefault(key, {})[name] = obj

    def _drop(self, name: str) -> None:
        old = self._cache.pop(name, None)
        key = owner_key(old) if old is not None else None
        if key is not None and (owned := self._by_owner.get(key)) is not None:
            owned.pop(name, None)
            if not owned:
                del self._by_owner[key]

    def _event(self, kind: str, obj: Any) -> None:
        with self._lock:
            if kind == "DELETED":
                self._drop(obj.metadata.name)
            else:
                self._put(obj)
            self._version = obj.metadata.resource_version or self._version
            key = owner_key(obj)
            for handler in list(self._handlers.get(key, {}).values()) if key is not None else []:
                handler.on_event(kind, obj)
