"""What publishing a pass's tasks costs (app.dispatch.publish_only), one by one against together (kombu's producer
batch: one Redis pipeline), on the real Redis at REDIS_URL. A pass that admits many jobs (a backlog draining into a
big fleet) publishes as many tasks right after its commit, on every admitted job's way to its worker.

    REDIS_URL=redis://127.0.0.1:6379/12 python benchmarks/publish.py --tasks 300 --rounds 20

The tasks go to a queue of this run's own, removed at the end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.dispatch import CeleryPublisher, publish_only  # noqa: E402
from app.domain.scheduling import EXECUTE_TASK  # noqa: E402
from app.models import OutboxMessage  # noqa: E402
from config import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=300, help="tasks per pass")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if not os.environ.get("REDIS_URL"):
        raise SystemExit("set REDIS_URL")
    settings = Settings.from_env()
    publisher = CeleryPublisher(settings)
    queue = f"publish-bench-{uuid.uuid4().hex}"
    messages = [OutboxMessage(id=i, job_id=f"job-{i}", task_name=EXECUTE_TASK, queue=queue, args=[f"job-{i}", "token"])
                for i in range(args.tasks)]
    ways = {  # publish_only sends a lone task by itself, as it sent every task before batches
        "one by one": lambda: sum(len(publish_only(publisher, [message])) for message in messages),
        "together": lambda: len(publish_only(publisher, messages)),
    }
    timings: dict[str, list[float]] = {name: [] for name in ways}
    try:
        publish_only(publisher, messages[:2])  # connections and pools warm
        for _ in range(args.rounds):
            for name, publish in ways.items():  # alternating, so both see the same machine
                started = time.perf_counter()
                assert publish() == args.tasks
                timings[name].append((time.perf_counter() - started) * 1000)
    finally:
        client = redis.Redis.from_url(settings.redis_url or "")
        client.delete(queue)
        client.close()
        publisher.close()
    print(f"publishing {args.tasks} tasks, {args.rounds} rounds each way, load {open('/proc/loadavg').read().split()[0]}:")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"  {name:<11} p50 {median:8.1f} ms per pass  {median * 1000 / args.tasks:6.0f} us per task")


if __name__ == "__main__":
    main()
