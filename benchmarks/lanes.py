"""Run a benchmark's jobs (each a `proreflow distill` subprocess) in parallel lanes, a job only once the job whose
teacher pairs it loads has finished, so those pairs are solved once and loaded, not solved twice side by side.

Whether lanes pay, and what they change: `benchmarks/lanes_speed.py` times one student alone and in lanes at each
thread count and compares the students (`benchmarks/results/lanes_speed.md`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence


@dataclass(frozen=True)
class Job:
    """One unit of work; `after`: the key of a job that must finish first where that job is in the same run."""

    key: Hashable
    after: Hashable | None = None


def run_lanes(jobs: Sequence[Job], lanes: int, work: Callable[[Job], Any]) -> dict[Hashable, Any]:
    """`work(job)` for every job, `lanes` at a time, each lane taking the first job in `jobs`' order that is ready.
    With one lane that is `jobs`' order exactly (when every `after` comes before its job). The first failure stops
    the lanes from taking new jobs; the running ones finish, then it is raised. Returns key -> result."""
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("job keys must be unique")
    pending, results, running = list(jobs), {}, set()
    failed: list[BaseException] = []
    ready = threading.Condition()

    def can_start(job: Job) -> bool:
        return job.after is None or job.after not in keys or job.after in results

    def lane() -> None:
        while True:
            with ready:
                while True:
                    if failed or not pending:
                        return
                    job = next((j for j in pending if can_start(j)), None)
                    if job is not None:
                        pending.remove(job)
                        running.add(job.key)
                        break
                    if not running:  # nothing runs that could make a pending job ready: `after` names a cycle
                        failed.append(ValueError(f"jobs wait on each other: {[j.key for j in pending]}"))
                        ready.notify_all()
                        return
                    ready.wait()
            error: BaseException | None = None
            try:
                out = work(job)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                error = exc
            with ready:  # one place that ends a job, whichever way it ended
                running.discard(job.key)
                if error is None:
                    results[job.key] = out
                else:
                    failed.append(error)
                ready.notify_all()

    threads = [threading.Thread(target=lane, name=f"lane-{i}", daemon=True) for i in range(min(lanes, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return results
