"""/api/v1/docs in a real headless browser (Debian's chromium, driven over the DevTools protocol): the page
lists every operation of the live OpenAPI document, with authentication on, and no request leaves the
machine. Every request the page makes is intercepted: loopback ones go on, any other is failed and fails
the test, so a CDN asset (or Swagger UI's online validator badge) cannot slip back in."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import websocket

from app.db import Database
from config import Settings
from tests.conftest import LiveServer

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
LOCAL_SCHEMES = {"data", "blob", "about"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium: scripts/test installs Debian's chromium package when it runs as root or with sudo")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return found


class DevTools:
    """The DevTools protocol over one websocket: calls wait for their answer, events seen meanwhile go to `on_event`."""

    def __init__(self, url: str, on_event: Callable[["DevTools", dict[str, Any]], None]) -> None:
        self.socket = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.on_event = on_event
        self.ids = itertools.count(1)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        message_id = next(self.ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        return message_id

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        message_id = self.send(method, params, session)
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.on_event(self, message)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[str]:
    """A headless chromium with its DevTools endpoint; yields the browser's websocket URL."""
    profile = tmp_path / "profile"
    command = [
        _browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
        "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=(tmp_path / "chromium.log").open("wb"))
    try:
        active_port = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active_port.exists() and len(active_port.read_text().splitlines()) >= 2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start:\n{(tmp_path / 'chromium.log').read_text()[-3000:]}")
            time.sleep(0.1)
        port, path = active_port.read_text().splitlines()[:2]
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def auth_server(settings: Settings, database: Database) -> Iterator[LiveServer]:
    server = LiveServer(settings.with_overrides(auth_enabled=True))
    yield server
    server.stop()


def _stays_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or (parts.scheme in ("http", "https", "ws", "wss") and parts.hostname in LOOPBACK_HOSTS)


def _documented_operations(server: LiveServer) -> set[tuple[str, str]]:
    import requests

    document = requests.get(f"{server.url}/api/v1/openapi.json", timeout=30).json()
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item if method in methods}


def test_docs_page_lists_every_operation_offline(browser: str, auth_server: LiveServer) -> None:
    requested: list[str] = []
    left_the_machine: list[str] = []
    errors: list[str] = []

    def on_event(tools: DevTools, message: dict[str, Any]) -> None:
        params = message.get("params", {})
        if message["method"] == "Fetch.requestPaused":
            url = params["request"]["url"]
            requested.append(url)
            if _stays_local(url):
                tools.send("Fetch.continueRequest", {"requestId": params["requestId"]}, message.get("sessionId"))
            else:
                left_the_machine.append(url)
                tools.send("Fetch.failRequest", {"requestId": params["requestId"], "errorReason": "BlockedByClient"}, message.get("sessionId"))
        elif message["method"] == "Runtime.exceptionThrown":
            errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])

    tools = DevTools(browser, on_event)
    try:
        target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tools.call("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}, session)
        tools.call("Runtime.enable", {}, session)
        tools.call("Page.enable", {}, session)
        tools.call("Page.navigate", {"url": f"{auth_server.url}/api/v1/docs"}, session)

        listed: list[list[str]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = tools.call("Runtime.evaluate", {
                "expression": (
                    "JSON.stringify(Array.from(document.querySelectorAll('.opblock')).map(b => ["
                    "(b.querySelector('.opblock-summary-method') || {}).textContent,"
                    "(b.querySelector('.opblock-summary-path') || {}).getAttribute && "
                    "b.querySelector('.opblock-summary-path').getAttribute('data-path')]))"
                ),
                "returnByValue": True,
            }, session)
            listed = json.loads(result["result"].get("value") or "[]")
            if listed:
                break
            time.sleep(0.25)
        title = tools.call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True}, session)["result"]["value"]
    finally:
        tools.close()

    assert not left_the_machine, f"requests that left the machine: {left_the_machine}"
    assert any("/api/v1/docs/assets/swagger-ui-bundle.js" in url for url in requested), requested
    assert any(url.endswith("/api/v1/openapi.json") for url in requested), requested
    assert title == "Job Service"
    assert not errors, errors
    shown = {(method, path) for method, path in listed}
    assert shown == _documented_operations(auth_server), f"listed: {sorted(shown)}"
    assert ("POST", "/api/v1/jobs/") in shown


def test_docs_assets_come_from_the_installed_package(auth_server: LiveServer) -> None:
    import requests
    from swagger_ui_bundle import swagger_ui_path

    page = requests.get(f"{auth_server.url}/api/v1/docs", timeout=30)
    assert page.status_code == 200 and "/api/v1/docs/assets/swagger-ui-bundle.js" in page.text and "https://" not in page.text
    bundle = requests.get(f"{auth_server.url}/api/v1/docs/assets/swagger-ui-bundle.js", timeout=30)  # no token needed
    assert bundle.status_code == 200 and bundle.content == (Path(swagger_ui_path) / "swagger-ui-bundle.js").read_bytes()
    for escape in ("..%2f..%2fsetup.cfg", "%2e%2e/%2e%2e/__init__.py", "nothing.js"):
        missing = requests.get(f"{auth_server.url}/api/v1/docs/assets/{escape}", timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
