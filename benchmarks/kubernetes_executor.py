"""Kubernetes executor at scale: N concurrently running jobs under one executor (one worker process) against
the project's fake API server, run in a separate process so that threads and memory measured here are the
executor's alone.

Prints: Job creates/s, watches opened (shared informers: 2 per cluster, whatever N), threads, Python heap
per running job (tracemalloc, log buffers included: each job prints two lines), and the time from a pod's
end (its last log line's timestamp + the script's exit delay) to the outcome's poll.

    python benchmarks/kubernetes_executor.py --jobs 1000 --hold 20 [--qps 0]
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def serve(queue: multiprocessing.Queue, nodes: int, hold: float, done: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    from tests.k8s_fake import FakeKubernetes, FakeNode, Script

    with FakeKubernetes([FakeNode(f"node-{i}", gpus=0, cpu_millis=1_000_000, memory_bytes=2**42) for i in range(nodes)],
                        step=0.05) as fake:
        # "started", then "finished" hold/2 later, then the container exits hold/2 after that.
        fake.scripts["bench/hold"] = Script(lines=["started", "finished"], line_interval=hold / 2)
        queue.put(fake.url)
        done.wait()
        queue.put(sum(1 for r in fake.requests if r.query.get("watch") == "true"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=20.0, help="seconds each job runs (all must be running at once)")
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--qps", type=float, default=0.0, help="client-side QPS (0: unlimited)")
    parser.add_argument("--launchers", type=int, default=16, help="threads creating Jobs")
    args = parser.parse_args()

    from kubernetes import client

    from app.kube import RateLimitedApiClient, TokenBucket, tune_configuration
    from tests.test_kubernetes_executor import make_spec
    from workers.executors.kubernetes import KubernetesExecutor, RetryPolicy, Timings

    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    done = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(queue, args.nodes, args.hold, done), daemon=True)
    server.start()
    url = queue.get(timeout=60)

    configuration = tune_configuration(client.Configuration(host=url), pool_maxsize=args.jobs + 64)
    api = RateLimitedApiClient(configuration, TokenBucket(args.qps, max(1, int(args.qps * 2))))
    executor = KubernetesExecutor(api, "bench", "bench", timings=Timings(gang_start_timeout_seconds=600, log_drain_seconds=5),
                                  retry=RetryPolicy(base_delay=0.2))
    threads_before = threading.active_count()
    tracemalloc.start()
    heap_before = tracemalloc.get_traced_memory()[0]

    last_line: dict[int, datetime] = {}
    lock = threading.Lock()

    def sink_for(i: int):  # type: ignore[no-untyped-def]
        def sink(lines):  # type: ignore[no-untyped-def]
            with lock:
                last_line[i] = max(line.at for line in lines)
        return sink

    specs = [make_spec("bench/hold", gpus=0, cpu_millis=10, memory_bytes=2**20, env={}) for _ in range(args.jobs)]
    started = time.monotonic()
    with ThreadPoolExecutor(args.launchers) as pool:
        executions = list(pool.map(lambda pair: executor.launch(pair[1], sink_for(pair[0])), enumerate(specs)))
    create_seconds = time.monotonic() - started
    jobs, pods = executor.informers()

    # All running: every execution has seen its member start (its first line arrived).
    deadline = time.monotonic() + args.hold
    while len(last_line) < args.jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    running = len(last_line)
    heap_running = tracemalloc.get_traced_memory()[0]
    threads_running = threading.active_count()

    latencies: list[float] = []
    outcomes: dict[int, object] = {}
    while len(outcomes) < args.jobs and time.monotonic() < started + args.hold * 3 + 120:
        for i, execution in enumerate(executions):
            if i not in outcomes and (outcome := execution.poll()) is not None:
                outcomes[i] = outcome
                with lock:
                    at = last_line.get(i)
                if at is not None:  # the fake's kubelet ends the container hold/2 after the last line
                    latencies.append((datetime.now(UTC) - at).total_seconds() - args.hold / 2)
        time.sleep(0.01)
    done.set()
    watches = queue.get(timeout=30)
    succeeded = sum(1 for o in outcomes.values() if getattr(o, "succeeded", False))

    print(f"jobs: {args.jobs}, running at once: {running}, succeeded: {succeeded}")
    print(f"Job creates/s: {args.jobs / create_seconds:.0f} ({create_seconds:.1f}s for {args.jobs}, {args.launchers} launcher threads, qps {args.qps or 'unlimited'})")
    print(f"watches opened (incl. resumes): {watches}; informers: jobs {jobs.lists} lists, pods {pods.lists} lists")
    print(f"threads: {threads_before} before, {threads_running} with {running} running (log followers: one per member)")
    print(f"Python heap per running job: {(heap_running - heap_before) / max(1, running) / 1024:.1f} KiB")
    if latencies:
        latencies.sort()
        print(f"pod's end -> outcome polled: p50 {statistics.median(latencies):.2f}s, "
              f"p99 {latencies[max(0, int(len(latencies) * 0.99) - 1)]:.2f}s (includes reading the last log lines)")
    executor.close()


if __name__ == "__main__":
    main()
