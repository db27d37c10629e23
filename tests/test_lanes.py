"""benchmarks/lanes.py: every job runs once, a job only after the one whose pairs it loads, lanes really overlap,
and the first failure stops the lanes."""

import threading
import time

import pytest
from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def lanes():
    return load_benchmark("lanes")


def test_one_lane_runs_in_order(lanes):
    jobs = [lanes.Job("a"), lanes.Job("b", after="a"), lanes.Job("c"), lanes.Job("d", after="z")]
    seen = []
    out = lanes.run_lanes(jobs, 1, lambda j: seen.append(j.key) or j.key.upper())
    assert seen == ["a", "b", "c", "d"]  # "z" is not in the run: d does not wait for it
    assert out == {"a": "A", "b": "B", "c": "C", "d": "D"}


def test_two_lanes_overlap_and_wait_for_the_producer(lanes):
    lock, log, live, most = threading.Lock(), [], [0], [0]

    def work(job):
        with lock:
            log.append(("start", job.key))
            live[0] += 1
            most[0] = max(most[0], live[0])
        time.sleep(0.05 if job.key != "slow" else 0.2)
        with lock:
            live[0] -= 1
            log.append(("end", job.key))
        return job.key

    jobs = [lanes.Job("slow"), lanes.Job("p"), lanes.Job("uses-slow", after="slow"), lanes.Job("q")]
    out = lanes.run_lanes(jobs, 2, work)
    assert set(out) == {"slow", "p", "uses-slow", "q"}
    assert most[0] == 2
    assert log.index(("end", "slow")) < log.index(("start", "uses-slow"))
    # the lane that finished p skips the job that waits on slow and takes q
    assert log.index(("start", "q")) < log.index(("start", "uses-slow"))


def test_first_failure_stops_new_jobs_and_is_raised(lanes):
    started = []

    def work(job):
        started.append(job.key)
        if job.key == "bad":
            raise RuntimeError("distill failed")
        return job.key

    with pytest.raises(RuntimeError, match="distill failed"):
        lanes.run_lanes([lanes.Job("bad"), lanes.Job("after-bad", after="bad"), lanes.Job("other")], 1, work)
    assert started == ["bad"]


def test_bad_input(lanes):
    with pytest.raises(ValueError, match="at least 1"):
        lanes.run_lanes([lanes.Job("a")], 0, lambda j: None)
    with pytest.raises(ValueError, match="unique"):
        lanes.run_lanes([lanes.Job("a"), lanes.Job("a")], 1, lambda j: None)
    with pytest.raises(ValueError, match="wait on each other"):
        lanes.run_lanes([lanes.Job("a", after="b"), lanes.Job("b", after="a")], 2, lambda j: None)


def test_tables_order_puts_each_pair_producer_before_its_users():
    tables = load_benchmark("mini_sd_tables")
    order = tables.distill_order(3)
    names = {st.name for st in tables.STUDENTS}
    position = {(st.name, seed): i for i, (seed, st) in enumerate(order)}
    assert len(position) == sum(len(st.seeds) for st in tables.STUDENTS)
    assert [seed for seed, _ in order] == sorted(seed for seed, _ in order)  # every row's seed 0 first
    for (seed, st), i in zip(order, range(len(order))):
        if st.pairs_from:
            assert st.pairs_from in names
            assert position[(st.pairs_from, seed)] < i
    assert [st.name for seed, st in order if seed == 1][0] == "2-rectified flow"
    assert {st.name for _, st in tables.distill_order(1)} == names


def test_lanes_speed_report():
    speed = load_benchmark("lanes_speed")
    walls = {"alone, 2 threads": [50.0, 49.0, 60.0], "alone, 1 thread": [65.0, 64.0, 66.0],
             "2 lanes, 1 thread each": [66.0, 70.0, 60.0], "2 lanes, 2 threads each (oversubscribed)": [300.0]}
    r = {"budget_steps": 40, "cores": 2, "repeats": 3, "command": "python benchmarks/lanes_speed.py",
         "wall_seconds_each": walls, "wall_seconds": {k: sorted(v)[len(v) // 2] for k, v in walls.items()},
         "thread_count_changes_the_student": {"tensors": 324, "max_abs_diff": 0.001, "bitwise": False},
         "lanes_match_alone": True}
    md = speed.markdown(r)
    # medians: 2 students in 66 s against 1 in 50 s
    assert "| 2 lanes, 1 thread each | 2 | 66.0 (66.0, 70.0, 60.0) | 1.52x |" in md
    assert "| alone, 1 thread | 1 | 65.0 (65.0, 64.0, 66.0) | 0.77x |" in md
    assert "| 2 lanes, 2 threads each (oversubscribed) | 2 | 300.0 (300.0) | 0.33x |" in md
    assert "max abs difference 0.001 over 324 UNet tensors (bitwise equal: False)" in md


def test_compare_two_table_runs():
    cmp = load_benchmark("mini_sd_compare")

    def row(name, seed, fd, g=4.0):
        return {"row": name, "steps": 4, "guidance": g, "seed": seed, "fd": fd, "prompt_accuracy": 0.9,
                "fidelity_rmse": 0.05}

    a = {"rows": [row("full", 0, 5.0), row("full", 1, 9.0), row("teacher", None, 3.0), row("only-a", 0, 1.0),
                  row("full", 0, 2.0, g=2.0)]}
    b = {"rows": [row("full", s, fd) for s, fd in enumerate((4.0, 4.5, 5.5))] + [row("teacher", None, 3.5),
                                                                                 row("full", 0, 2.1, g=2.0)]}
    rows = cmp.compare(a, b)
    assert [(r["row"], r["guidance"]) for r in rows] == [("full", 4.0), ("teacher", 4.0), ("full", 2.0)]
    md = cmp.markdown(rows, "lanes", "tables")
    assert "| full | 4 | 4 | 5.00 vs 4.67 ± 0.76 (+0.4 std) |" in md
    assert "| teacher | 4 | 4 | 3.00 vs 3.50 |" in md
    assert "| 2 |" not in md  # the guidance sweep is left out
    # seed 0 against seed 0 (5.0 vs 4.0) and the spread over b's seeds (0.76); the teacher has one value: left out
    assert "| FD | 1.00 | 0.76 |" in md


def test_tables_refuse_more_lanes_than_threads(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "mini_sd_tables.py"
    if not script.is_file():
        pytest.skip("benchmarks/ is not beside the tests")
    for jobs in ("3", "0"):
        got = subprocess.run([sys.executable, str(script), "--jobs", jobs, "--threads", "2", "--teacher",
                              str(tmp_path / "none")], capture_output=True, text=True)
        assert got.returncode != 0
        assert f"--jobs must be between 1 and --threads (2), got {jobs}" in got.stderr
