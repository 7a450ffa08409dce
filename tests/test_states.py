"""The state machine: every allowed transition, every refused one, and the event each one writes."""
from __future__ import annotations

import itertools

import pytest
from sqlalchemy import select

from app.db import Database, transaction
from app.domain import jobs
from app.domain.callers import LOCAL_ADMIN
from app.domain.errors import Conflict
from app.domain.quantities import cpu_to_millis, format_bytes, format_millis, memory_to_bytes
from app.domain.states import ALLOWED_TRANSITIONS, TERMINAL, JobStatus, can_transition, sources_of
from app.models import Job, JobEvent
from config import Settings

ALLOWED = {
    ("pending", "queued"), ("pending", "failed"), ("pending", "cancelled"),
    ("queued", "running"), ("queued", "pending"), ("queued", "failed"), ("queued", "cancelled"),
    ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"), ("running", "pending"),
}


@pytest.mark.parametrize("current, target", list(itertools.product(JobStatus, JobStatus)))
def test_transition_table(current: JobStatus, target: JobStatus) -> None:
    assert can_transition(current, target) == ((current.value, target.value) in ALLOWED)


def test_terminal_states_have_no_way_out() -> None:
    for state in TERMINAL:
        assert ALLOWED_TRANSITIONS[state] == frozenset()
    assert set(sources_of(JobStatus.RUNNING)) == {"queued"}


def _pending_job(database: Database, settings: Settings) -> str:
    request = jobs.JobRequest(
        job_type="t", priority=5, image="i", config={}, resources={}, cpu_millis=0, memory_bytes=0, gpus=0
    )
    with database.session() as s:
        return jobs.submit(s, LOCAL_ADMIN, request, settings).id


@pytest.mark.parametrize("path", [["queued", "running", "succeeded"], ["queued", "running", "pending", "queued", "running", "failed"], ["cancelled"], ["queued", "pending"]])
def test_allowed_paths_record_one_event_each(database: Database, settings: Settings, path: list[str]) -> None:
    job_id = _pending_job(database, settings)
    with database.session() as s:
        for target in path:
            with transaction(s):
                job = s.get(Job, job_id, with_for_update=True)
                jobs.record_transition(s, job, JobStatus(target), reason=f"to {target}", actor="test")
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    assert [e.to_status for e in events] == ["pending", *path]
    assert [e.from_status for e in events] == [None, "pending", *path[:-1]]


@pytest.mark.parametrize("target", ["running", "succeeded", "pending"])
def test_refused_transition_writes_nothing(database: Database, settings: Settings, target: str) -> None:
    job_id = _pending_job(database, settings)
    with database.session() as s:
        with pytest.raises(Conflict):
            with transaction(s):
                job = s.get(Job, job_id, with_for_update=True)
                jobs.record_transition(s, job, JobStatus(target), reason="nope", actor="test")
        assert s.get(Job, job_id).status == "pending"
        assert len(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()) == 1


@pytest.mark.parametrize("text, millis", [("2", 2000), ("500m", 500), ("0.5", 500), ("1.25", 1250)])
def test_cpu_quantities(text: str, millis: int) -> None:
    assert cpu_to_millis(text) == millis


@pytest.mark.parametrize("text, amount", [("8Gi", 8 * 2**30), ("512Mi", 512 * 2**20), ("1G", 10**9), ("1500", 1500), ("1.5Gi", 3 * 2**29), ("2k", 2000)])
def test_memory_quantities(text: str, amount: int) -> None:
    assert memory_to_bytes(text) == amount


@pytest.mark.parametrize(
    "parse, text",
    [(memory_to_bytes, t) for t in ["", "abc", "1.2.3", "5 Gi", "8GB", "-1", "1e3x", "0.5"]]
    + [(cpu_to_millis, t) for t in ["two", "0.0005", "0.5m", "-2"]],
)
def test_bad_quantities(parse, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        parse(text)


def test_quantity_formatting_round_trips() -> None:
    assert format_millis(2000) == "2" and format_millis(1500) == "1.5"
    assert format_bytes(8 * 2**30) == "8Gi" and format_bytes(1000) == "1000"
    for millis in (1, 250, 999, 1000, 1001, 1500, 15_890, 2_000_000):
        assert cpu_to_millis(format_millis(millis)) == millis


@pytest.mark.parametrize(
    "amount, shown",
    [
        (24683656 * 2**10, "23.5Gi"),  # a kubelet's MemTotal, in Ki
        (132015936 * 2**10, "125.9Gi"),
        (512 * 2**20, "512Mi"),
        (1536 * 2**20, "1.5Gi"),
        (1023, "1023"),
        (1025, "1.0Ki"),
        (2**40 - 2**20, "1.0Ti"),  # not 1024.0Gi
        (64 * 2**40, "64Ti"),
    ],
)
def test_memory_is_shown_in_the_largest_binary_unit(amount: int, shown: str) -> None:
    assert format_bytes(amount) == shown


@pytest.mark.parametrize("millis, shown", [(250, "250m"), (15_890, "15.89"), (2_250, "2.25"), (64_000, "64"), (1_001, "1.001")])
def test_cpu_is_shown_in_cores(millis: int, shown: str) -> None:
    assert format_millis(millis) == shown


def test_retry_n_waits_base_times_multiplier_to_the_n_minus_1() -> None:
    """README: retry n (1, 2, ...) waits `RETRY_BACKOFF_BASE_SECONDS * backoff_multiplier ** (n - 1)`."""
    from app.domain.scheduling import retry_delay_seconds

    settings = Settings(retry_backoff_base_seconds=10)
    # The delay is taken before the retry is counted: retry_count is n - 1 while retry n is scheduled.
    delays = [retry_delay_seconds(settings, Job(backoff_multiplier=2, retry_count=n - 1)) for n in (1, 2, 3)]
    assert delays == [10, 20, 40]
