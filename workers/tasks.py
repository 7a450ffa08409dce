"""Celery tasks: thin; they take ids (JSON) and hand over to the runner."""
from __future__ import annotations

from celery import shared_task

from app.domain.scheduling import ADOPT_TASK, EXECUTE_TASK
from workers.context import worker_context


@shared_task(name=EXECUTE_TASK, ignore_result=True)
def execute_job(job_id: str, dispatch_token: str) -> str:
    return worker_context().runner.run(job_id, dispatch_token)


@shared_task(name=ADOPT_TASK, ignore_result=True)
def adopt_job(job_id: str, dispatch_token: str) -> str:
    return worker_context().runner.adopt(job_id, dispatch_token)
