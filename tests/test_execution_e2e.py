"""Jobs really run: real scheduler, real Celery workers on Redis, real processes, real PostgreSQL."""
from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests
from sqlalchemy import select, text

from app.db import Database
from app.dispatch import CeleryPublisher
from app.domain.scheduling import EXECUTE_TASK, admit
from app.models import Job, JobEvent, OutboxMessage
from config import Settings
from tests.conftest import ApiClient, wait_for, wait_for_status


def events(database: Database, job_id: str) -> list[JobEvent]:
    with database.session() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited already
        return stat.read().split()[2] != "Z"


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_a_job_runs_and_its_logs_are_kept(api: ApiClient, start_scheduler, start_worker, database: Database) -> None:
    start_worker("node-a")
    start_scheduler()
    job = api.submit(command=sh('echo "hello $JOB_ID"; echo "config=$JOB_CONFIG"; echo oops >&2'), config={"model": "m"})
    done = wait_for_status(api, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["exit_code"] == 0 and done["worker_id"].startswith("worker-node-a-")
    assert done["started_at"] and done["completed_at"] and ts(done["started_at"]) <= ts(done["completed_at"])
    assert [e.to_status for e in events(database, job["id"])] == ["pending", "queued", "running", "succeeded"]

    plain = api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"})
    assert plain.headers["Content-Type"].startswith("text/plain")
    assert sorted(plain.text.splitlines()) == sorted([f"hello {job['id']}", 'config={"model": "m"}', "oops"])
    stamped = api.get(f"/jobs/{job['id']}/logs").text.splitlines()
    assert all(len(line.split(" ", 1)[0]) == 24 and line.split(" ", 1)[0].endswith("Z") for line in stamped)
    assert api.get(f"/jobs/{job['id']}/logs", params={"tail": 1, "timestamps": "false"}).text.count("\n") == 1


def test_a_failing_job_records_its_exit_code(api: ApiClient, start_scheduler, start_worker) -> None:
    start_worker("node-a")
    start_scheduler()
    job = api.submit(command=sh("exit 3"))
    done = wait_for_status(api, job["id"], {"succeeded", "failed"})
    assert done["status"] == "failed" and done["exit_code"] == 3
    assert "exited with code 3" in done["status_reason"]


def test_a_job_without_a_command_fails_at_once_on_the_local_executor(api: ApiClient, start_scheduler, start_worker) -> None:
    start_worker("node-a")
    start_scheduler()
    job = api.submit(image="pytorch:2", retry_policy={"max_retries": 3})
    done = wait_for_status(api, job["id"], {"failed"})
    assert "cannot run an image" in done["status_reason"] and done["retry_count"] == 0


def test_retries_wait_their_backoff(api: ApiClient, start_scheduler, start_worker, database: Database) -> None:
    start_worker("node-a", RETRY_BACKOFF_BASE_SECONDS="0.4")
    start_scheduler()
    job = api.submit(command=sh('echo "attempt $JOB_ATTEMPT"; exit 1'), retry_policy={"max_retries": 2, "backoff_multiplier": 3})
    done = wait_for_status(api, job["id"], {"failed"}, timeout=40)
    assert done["retry_count"] == 2 and done["exit_code"] == 1
    timeline = events(database, job["id"])
    assert [e.to_status for e in timeline] == ["pending", "queued", "running", "pending", "queued", "running", "pending", "queued", "running", "failed"]
    retries = [i for i, e in enumerate(timeline) if e.from_status == "running" and e.to_status == "pending"]
    for attempt, index in enumerate(retries):
        waited = (timeline[index + 1].at - timeline[index].at).total_seconds()
        assert waited >= 0.4 * 3**attempt, (attempt, waited)  # base * multiplier ** n
        assert timeline[index].details["backoff_seconds"] == pytest.approx(0.4 * 3**attempt)
    logs = api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"}).text.splitlines()
    # Each retry's lines start below a marker line.
    assert logs == ["attempt 0", "=== attempt 1 begins (retry 1) ===", "attempt 1", "=== attempt 2 begins (retry 2) ===", "attempt 2"]


def test_a_timeout_kills_the_process_group_and_is_not_retried(api: ApiClient, start_scheduler, start_worker, tmp_path: Path) -> None:
    start_worker("node-a")
    start_scheduler()
    pids = tmp_path / "pids"
    # The job starts a child too: the whole group must go.
    job = api.submit(
        command=sh(f'sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; wait'),
        timeout_seconds=1,
        retry_policy={"max_retries": 2},
    )
    done = wait_for_status(api, job["id"], {"failed"}, timeout=30)
    assert "timed out after 1s" in done["status_reason"] and done["retry_count"] == 0
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    wait_for(lambda: not any(process_alive(p) for p in started), 10, message="job processes to be gone")


def test_cancel_of_a_running_job_stops_its_processes(api: ApiClient, start_scheduler, start_worker, tmp_path: Path, database: Database) -> None:
    start_worker("node-a")
    start_scheduler()
    pid_file = tmp_path / "pid"
    job = api.submit(command=sh(f"echo $$ > {pid_file}; exec sleep 120"))
    wait_for_status(api, job["id"], "running")
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, message="pid file"))
    assert process_alive(pid)
    response = api.delete(f"/jobs/{job['id']}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_for(lambda: not process_alive(pid), 10, message="the cancelled job's process to stop")
    with database.session() as s:
        wait_for(lambda: not s.get(Job, job["id"], populate_existing=True).holds_resources, 10, message="resources released")
    assert api.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"


def test_a_worker_killed_mid_job_is_detected_and_the_job_retried(api: ApiClient, start_scheduler, start_worker, tmp_path: Path, database: Database) -> None:
    doomed = start_worker("node-doomed")
    start_scheduler()
    pid_file = tmp_path / "pid"
    job = api.submit(
        command=sh(f'if [ "$JOB_ATTEMPT" = 0 ]; then echo $$ > {pid_file}; exec sleep 120; fi; echo recovered'),
        retry_policy={"max_retries": 1},
    )
    wait_for_status(api, job["id"], "running")
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, message="pid file"))
    os.killpg(doomed.process.pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(pid), 10, message="the job's process to die with its worker")
    start_worker("node-b")
    done = wait_for_status(api, job["id"], {"succeeded", "failed"}, timeout=40)
    assert done["status"] == "succeeded" and done["retry_count"] == 1
    assert done["worker_id"].startswith("worker-node-b-")
    lost = [e for e in events(database, job["id"]) if "lost" in e.reason]
    assert lost and lost[0].from_status == "running" and lost[0].to_status == "pending"


def test_a_duplicate_or_stale_delivery_never_runs_a_job_twice(api: ApiClient, start_scheduler, start_worker, database: Database, e2e_settings: Settings) -> None:
    start_worker("node-a", concurrency=3)
    start_scheduler()
    job = api.submit(command=sh("echo once; sleep 1"))
    wait_for_status(api, job["id"], "running")
    with database.session() as s:
        token = s.get(Job, job["id"]).dispatch_token
    publisher = CeleryPublisher(e2e_settings)
    queue = "high-priority.local.node-a"
    publisher.publish(EXECUTE_TASK, queue, [job["id"], token])
    publisher.publish(EXECUTE_TASK, queue, [job["id"], "stale-token"])
    publisher.close()
    done = wait_for_status(api, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    time.sleep(1.0)  # give the duplicates time to be consumed
    assert [e.to_status for e in events(database, job["id"])].count("running") == 1
    assert api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"}).text == "once\n"


def test_strict_priority_order_when_capacity_is_saturated(api: ApiClient, start_scheduler, start_worker) -> None:
    start_worker("node-a", concurrency=1)
    start_scheduler()
    blocker = api.submit(command=sh("sleep 1.5"), priority=50)
    wait_for_status(api, blocker["id"], "running")
    low = api.submit(command=["true"], priority=5)
    mid = api.submit(command=["true"], priority=40)
    high = api.submit(command=["true"], priority=95)
    mid_old_twin = api.submit(command=["true"], priority=40)
    assert api.get(f"/jobs/{low['id']}").json()["queue_position"] == 3
    order = [low, mid, high, mid_old_twin]
    finished = [wait_for_status(api, j["id"], "succeeded") for j in order]
    started = sorted(finished, key=lambda j: ts(j["started_at"]))
    assert [j["id"] for j in started] == [high["id"], mid["id"], mid_old_twin["id"], low["id"]]


def test_max_concurrency_holds_across_two_workers(api: ApiClient, start_scheduler, start_worker, database: Database) -> None:
    start_worker("node-a", concurrency=2)
    start_worker("node-b", concurrency=2)
    start_scheduler(JOB_QUEUES="high-priority:50-100:5,default:0-49:1")
    submitted = [api.submit(command=sh("sleep 0.4"), priority=10) for _ in range(4)]
    runs = [wait_for_status(api, j["id"], "succeeded", timeout=40) for j in submitted]
    intervals = sorted((ts(r["started_at"]), ts(r["completed_at"])) for r in runs)
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert start >= end, "two default-queue jobs ran at once"


def test_each_job_gets_its_own_gpus(api: ApiClient, start_scheduler, start_worker) -> None:
    start_worker("gpu-host", concurrency=6, gpus=4)
    start_scheduler()
    script = sh('echo "gpus=$CUDA_VISIBLE_DEVICES"; sleep 1')
    gpu_jobs = [api.submit(command=script, resources={"gpu": 1, "cpu": "100m"}) for _ in range(5)]
    cpu_job = api.submit(command=script, resources={"gpu": 0, "cpu": "100m"})
    runs = [wait_for_status(api, j["id"], "succeeded", timeout=40) for j in gpu_jobs]
    seen = [api.get(f"/jobs/{j['id']}/logs", params={"timestamps": "false"}).text.strip() for j in gpu_jobs]
    assert all(s in {"gpus=0", "gpus=1", "gpus=2", "gpus=3"} for s in seen), seen
    # Four fit at once; the fifth waits for a free GPU, and no two overlapping runs share one.
    for i, a in enumerate(runs):
        for j, b in enumerate(runs[i + 1 :], i + 1):
            overlap = ts(a["started_at"]) < ts(b["completed_at"]) and ts(b["started_at"]) < ts(a["completed_at"])
            assert not (overlap and seen[i] == seen[j]), (seen[i], a, b)
    assert len(set(seen[:4])) == 4  # the first four ran side by side, one GPU each
    wait_for_status(api, cpu_job["id"], "succeeded")
    assert api.get(f"/jobs/{cpu_job['id']}/logs", params={"timestamps": "false"}).text.strip() == "gpus="


def test_a_request_that_can_never_fit_is_refused_at_submit(api: ApiClient, start_worker) -> None:
    start_worker("gpu-host", gpus=4)
    response = api.post("/jobs/", json={"job_type": "train", "command": ["true"], "resources": {"gpu": 8}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and error["details"][0]["field"] == "resources"
    assert "4 GPU" in error["details"][0]["message"]
    gang = {"job_type": "train", "command": ["true"], "resources": {"gpu": 3}, "gang": {"enabled": True, "min_members": 2}}
    assert api.post("/jobs/", json=gang).status_code == 400


def test_a_gang_starts_all_members_together_on_disjoint_gpus(api: ApiClient, start_scheduler, start_worker) -> None:
    start_worker("gpu-host", concurrency=2, gpus=4)
    start_scheduler()
    job = api.submit(
        command=sh('echo "rank=$JOB_RANK world=$JOB_WORLD_SIZE gpus=$CUDA_VISIBLE_DEVICES"'),
        resources={"gpu": 2},
        gang={"enabled": True, "min_members": 2},
    )
    wait_for_status(api, job["id"], "succeeded")
    lines = sorted(api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"}).text.splitlines())
    assert lines == ["[rank 0] rank=0 world=2 gpus=0,1", "[rank 1] rank=1 world=2 gpus=2,3"]


def test_one_gang_member_failing_fails_the_gang(api: ApiClient, start_scheduler, start_worker, tmp_path: Path) -> None:
    start_worker("gpu-host", concurrency=2, gpus=4)
    start_scheduler()
    pid_file = tmp_path / "rank0"
    job = api.submit(
        command=sh(f'if [ "$JOB_RANK" = 1 ]; then sleep 0.3; exit 4; fi; echo $$ > {pid_file}; exec sleep 120'),
        resources={"gpu": 1},
        gang={"enabled": True, "min_members": 2},
    )
    done = wait_for_status(api, job["id"], {"failed", "succeeded"}, timeout=20)
    assert done["status"] == "failed" and done["exit_code"] == 4
    assert "member 1 of 2" in done["status_reason"]
    wait_for(lambda: not process_alive(int(pid_file.read_text())), 10, message="rank 0 to be stopped")


def test_follow_streams_lines_as_produced_and_resumes(api: ApiClient, start_scheduler, start_worker) -> None:
    start_worker("node-a")
    start_scheduler()
    job = api.submit(command=sh("for i in 1 2 3 4; do echo line-$i; sleep 0.3; done"))
    received: list[tuple[str, str]] = []
    ended = None
    with requests.get(api.url(f"/jobs/{job['id']}/logs"), params={"follow": "true", "timestamps": "false"}, stream=True, timeout=30) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        event: dict[str, str] = {}
        for raw in stream.iter_lines(decode_unicode=True):
            if raw:
                key, _, value = raw.partition(": ")
                event[key] = value
                continue
            if event.get("event") == "end":
                ended = event["data"]
                break
            if "data" in event:
                received.append((event["id"], event["data"]))
            event = {}
    assert [line for _, line in received] == ["line-1", "line-2", "line-3", "line-4"]
    assert ended == "succeeded"
    resumed = requests.get(
        api.url(f"/jobs/{job['id']}/logs"), params={"follow": "true", "timestamps": "false"},
        headers={"Last-Event-ID": received[1][0]}, timeout=30,
    ).text
    assert "line-1" not in resumed and "line-2" not in resumed
    assert "data: line-3" in resumed and "data: line-4" in resumed and "event: end" in resumed


def test_an_admission_whose_publisher_died_is_published_by_the_sweep(api: ApiClient, start_worker, start_scheduler, database: Database, e2e_settings: Settings) -> None:
    start_worker("node-a")
    job = api.submit(command=["true"])
    # The publisher "dies" right after the admission commits: the job is queued, its task unsent.
    with database.session() as s:
        assert admit(s, e2e_settings).admitted == [job["id"]]
        assert s.scalar(select(OutboxMessage.job_id)) == job["id"]
    assert api.get(f"/jobs/{job['id']}").json()["status"] == "queued"
    start_scheduler(OUTBOX_REPUBLISH_AFTER_SECONDS="0.5")
    wait_for_status(api, job["id"], "succeeded")
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM outbox")).scalar() == 0


def test_several_schedulers_admit_each_job_once(api: ApiClient, start_scheduler, start_worker, database: Database) -> None:
    start_worker("node-a", concurrency=4)
    for _ in range(3):
        start_scheduler()
    submitted = [api.submit(command=["true"], priority=i % 100) for i in range(20)]
    for job in submitted:
        wait_for_status(api, job["id"], "succeeded")
    with database.engine.connect() as conn:
        admissions = conn.execute(text("SELECT job_id, count(*) FROM job_events WHERE to_status = 'queued' GROUP BY job_id")).all()
    assert len(admissions) == 20 and all(count == 1 for _, count in admissions)


def test_a_worker_sends_task_events_only_once_a_monitor_asks_for_them(api: ApiClient, start_scheduler, start_worker,
                                                                      e2e_env: dict[str, str]) -> None:
    """Unasked, task events cost the worker a Redis PUBLISH per task state (on the way to the claim, too);
    Flower asks for them (`enable_events`), and from then on the worker sends them."""
    import threading

    from celery import Celery

    monitor = Celery("monitor", broker=e2e_env["REDIS_URL"])
    received: list[dict] = []
    with monitor.connection() as connection:
        receiver = monitor.events.Receiver(connection, handlers={"*": received.append})
        listening = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
        listening.start()
        try:
            with monitor.events.default_dispatcher() as dispatcher:  # the receiver is subscribed once it sees this
                wait_for(lambda: dispatcher.send("test-listening") or any(e["type"] == "test-listening" for e in received),
                         message="the event receiver to subscribe")
            start_worker("node-a")
            start_scheduler()
            unasked = api.submit(command=["true"])
            assert wait_for_status(api, unasked["id"], {"succeeded", "failed"})["status"] == "succeeded"
            replies = monitor.control.enable_events(reply=True, timeout=10)  # what Flower does
            assert replies, "the worker did not answer enable_events"
            asked = api.submit(command=["true"])
            assert wait_for_status(api, asked["id"], {"succeeded", "failed"})["status"] == "succeeded"
            ids = {e["uuid"]: e["args"] for e in received if e["type"] == "task-received"}
            done = wait_for(lambda: [ids.get(e["uuid"]) for e in received if e["type"] == "task-succeeded"],
                            message="the task events of the job run once a monitor asked")
        finally:
            receiver.should_stop = True
            listening.join(timeout=5)
    # Events of one sender arrive in order: the job run before the monitor asked would have come first.
    assert all(unasked["id"] not in str(args) for args in ids.values()), ids
    assert len(done) == 1 and asked["id"] in str(done[0]), (ids, done)
