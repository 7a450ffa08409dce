"""The `web` process as the Procfile runs it: real gunicorn masters with config/gunicorn.py, over real HTTP."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from app.db import Database
from tests.conftest import ApiClient, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


class Gunicorn:
    """`gunicorn --config python:config.gunicorn` (the Procfile's web line) in its own process group."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "python:config.gunicorn"],
            env={**env, "PORT": str(port)}, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        def live() -> bool:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                return requests.get(f"{self.url}/health/live", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(live, timeout, 0.2, message=f"gunicorn on port {self.port}")

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def gunicorn(service_env: dict[str, str], database: Database, tmp_path: Path) -> Iterator[Any]:
    """gunicorn(port=None, **env) -> a started (not yet ready) Gunicorn; every one is killed after the test."""
    started: list[Gunicorn] = []

    def start(port: int | None = None, **env: str) -> Gunicorn:
        server = Gunicorn({**os.environ, **service_env, **env}, port or free_port(), tmp_path / f"gunicorn-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def raw_request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def assert_envelope(status: int, headers: dict[str, str], body: bytes, expected: int, code: str) -> None:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "details", "request_id"}
    assert error["code"] == code and error["message"] and error["details"] == []
    assert error["request_id"] == headers["x-request-id"]


def test_gunicorns_own_refusals_answer_in_the_envelope(gunicorn) -> None:
    server = gunicorn(WEB_CONCURRENCY="1", LOG_FORMAT="json", LOG_LEVEL="INFO")
    server.wait_ready()
    port = server.port
    long_uri = b"GET /api/v1/jobs/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert_envelope(*raw_request(port, long_uri), 414, "URI_TOO_LONG")
    big_header = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"
    assert_envelope(*raw_request(port, big_header), 431, "HEADERS_TOO_LARGE")
    many_headers = b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    assert_envelope(*raw_request(port, many_headers), 431, "HEADERS_TOO_LARGE")
    assert_envelope(*raw_request(port, b"NOT HTTP AT ALL\r\n\r\n"), 400, "BAD_REQUEST")
    # The app's own answers are unchanged, and gunicorn writes no access log line beside the app's JSON one.
    response = requests.get(f"{server.url}/api/v1/nothing-here", timeout=10, headers={"X-Request-ID": "probe-1"})
    assert response.status_code == 404 and response.json()["error"]["request_id"] == "probe-1"
    server.stop()
    # One JSON line per request (the app's), gunicorn's own lines JSON too, no access log beside them.
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    mentions = [line for line in lines if "nothing-here" in line["message"]]
    assert len(mentions) == 1 and mentions[0]["request_id"] == "probe-1" and mentions[0]["logger"] == "jobservice.api"
    assert any(line["logger"] == "gunicorn.error" and "EnvelopeGeventWorker" in line["message"] for line in lines)
    assert any(line["level"] == "WARNING" and "Request Line is too large" in line["message"] for line in lines)


def test_probes_and_lists_answer_while_many_streams_are_open(gunicorn) -> None:
    # One process: with the old gthread worker its 16 threads were all taken by 16 streams.
    server = gunicorn(WEB_CONCURRENCY="1", STREAMS_PER_CALLER="200", STREAMS_PER_PROCESS="200")
    server.wait_ready()
    api = ApiClient(server.url)
    job = api.submit()
    streams = [
        requests.get(api.url(f"/jobs/{job['id']}/{'logs' if i % 2 else 'events'}"), params={"follow": "true"}, stream=True, timeout=30)
        for i in range(60)
    ]
    try:
        assert all(s.status_code == 200 for s in streams)
        assert requests.get(f"{server.url}/health/live", timeout=10).status_code == 200
        listed = api.get("/jobs/", timeout=10)
        assert listed.status_code == 200 and listed.json()["total"] == 1
        # More concurrent requests than the database pool holds (10 + 20): greenlets wait for a connection.
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda _: requests.get(api.url("/jobs/"), timeout=30).status_code, range(100)))
        assert answers == [200] * 100
        assert api.delete(f"/jobs/{job['id']}").status_code == 200
        for stream in streams:  # every follower still gets its end
            assert any(line == "event: end" for line in stream.iter_lines(decode_unicode=True))
    finally:
        for stream in streams:
            stream.close()


def test_rate_limits_count_in_redis_under_gevent_workers(gunicorn) -> None:
    server = gunicorn(WEB_CONCURRENCY="2", RATELIMIT_ENABLED="true", RATELIMIT_LIST="5/minute")
    server.wait_ready()
    # Fresh connections, so that both processes answer: the count is shared through Redis.
    codes = [requests.get(f"{server.url}/api/v1/jobs/", timeout=10, headers={"Connection": "close"}).status_code for _ in range(7)]
    assert codes == [200] * 5 + [429] * 2


def listeners_on(port: int) -> int:
    """Sockets in LISTEN state on `port` (IPv4), from /proc: what the kernel sees, whoever holds them."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            count += 1
    return count


def test_a_master_binds_while_an_orphaned_worker_still_listens_on_the_port(gunicorn) -> None:
    port = free_port()
    # What a SIGKILLed master leaves behind: a worker that still holds a listening socket on the port.
    orphan = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    orphan.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    orphan.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    orphan.bind(("0.0.0.0", port))
    orphan.listen(8)
    try:
        server = gunicorn(port, WEB_CONCURRENCY="1")
        wait_for(lambda: listeners_on(port) == 2 or server.process.poll() is not None, 30, 0.1, message="a second listener")
        assert server.process.poll() is None, server.log_path.read_text()[-3000:]
        assert "Connection in use" not in server.log_path.read_text()
    finally:
        orphan.close()
    server.wait_ready()


def test_a_restarted_master_serves_at_once_after_the_old_one_was_killed(gunicorn) -> None:
    port = free_port()
    old = gunicorn(port, WEB_CONCURRENCY="2")
    old.wait_ready()
    api = ApiClient(old.url)
    job = api.submit()
    stream = requests.get(api.url(f"/jobs/{job['id']}/events"), params={"follow": "true"}, stream=True, timeout=30)
    assert stream.status_code == 200
    orphans = old.worker_pids()
    assert len(orphans) == 2
    os.kill(old.process.pid, signal.SIGKILL)
    old.process.wait(10)
    new = gunicorn(port, WEB_CONCURRENCY="2")
    new.wait_ready()
    assert "Connection in use" not in new.log_path.read_text()
    # The orphans notice their master is gone and leave (closing their streams) instead of lingering.
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in orphans), 15, 0.2,
             message="the orphaned workers to exit")
    stream.close()

    def served() -> bool:
        # A connection the kernel queued on an orphan's socket just before it closed is reset: clients retry.
        try:
            return ApiClient(new.url).get(f"/jobs/{job['id']}", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(served, 10, 0.2, message="the new master to serve the job")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


def _parsed_request(raw: bytes) -> tuple[Any, socket.socket, socket.socket]:
    """A request as gunicorn's worker parses it, read from a SOCK_SEQPACKET pair: every write on the server's
    end arrives as one record on the client's, so a test sees how many writes an answer took."""
    from gunicorn.config import Config
    from gunicorn.http.parser import RequestParser

    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client_end.sendall(raw)
    cfg = Config()
    return next(RequestParser(cfg, server_end, ("127.0.0.1", 40000))), server_end, client_end


def test_an_answer_of_known_length_leaves_in_one_write_head_and_body() -> None:
    from gunicorn.config import Config
    from gunicorn.http import wsgi

    from config.gunicorn import OneWriteResponse

    request, server_end, client_end = _parsed_request(b"POST /api/v1/jobs/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    response, _environ = wsgi.create(request, server_end, ("127.0.0.1", 40000), ("127.0.0.1", 8000), Config(),
                                     response_class=OneWriteResponse)
    body = b'{"id": "job-0123456789ab", "status": "pending"}'
    response.start_response("201 CREATED", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    response.write(body)
    response.close()
    client_end.settimeout(5)
    first = client_end.recv(65536)
    assert first.startswith(b"HTTP/1.1 201 CREATED\r\n")
    head, _, rest = first.partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: " + str(len(body)).encode() in head + b"\r\n"
    assert rest == body  # the whole answer in the first record: one write


def test_a_streamed_answer_is_still_written_as_gunicorn_writes_it() -> None:
    from gunicorn.config import Config
    from gunicorn.http import wsgi

    from config.gunicorn import OneWriteResponse

    request, server_end, client_end = _parsed_request(b"GET /api/v1/jobs/x/events HTTP/1.1\r\nHost: a\r\n\r\n")
    response, _environ = wsgi.create(request, server_end, ("127.0.0.1", 40000), ("127.0.0.1", 8000), Config(),
                                     response_class=OneWriteResponse)
    response.start_response("200 OK", [("Content-Type", "text/event-stream")])  # no length: chunked
    response.write(b"data: 1\n\n")
    response.write(b"data: 2\n\n")
    response.close()
    client_end.settimeout(5)
    records = []
    server_end.close()
    while chunk := client_end.recv(65536):
        records.append(chunk)
    assert records[0].endswith(b"\r\n\r\n") and b"Transfer-Encoding: chunked" in records[0]  # the head alone first
    assert b"".join(records[1:]) == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
