"""The loader pool: a worker that dies or hangs costs one retry, then a reported failure, never a hang."""

import multiprocessing as mp
import os
import time
from pathlib import Path

from data_pipelines.workers import WorkerFailure, WorkerPool


def work(task):
    kind, value, marker = task
    if kind == "die" or (kind == "die-once" and not Path(marker).exists()):
        Path(marker).touch()
        os._exit(9)
    if kind == "hang":
        time.sleep(3600)
    if kind == "slow":  # works (CPU time), for `marker` seconds
        end = time.monotonic() + float(marker)
        while time.monotonic() < end:
            sum(range(1000))
    return value * 2


def run(tasks, **kwargs):
    pool = WorkerPool(work, 2, mp.get_context("fork"), **kwargs)
    try:
        results = dict(pool.map_unordered(tasks))
        return results, pool.replaced
    finally:
        pool.close()


def test_results_arrive_for_every_task(tmp_path):
    results, replaced = run([("ok", i, "") for i in range(50)], capacity=3)
    assert results == {i: 2 * i for i in range(50)} and replaced == 0


def test_a_dead_worker_costs_one_retry(tmp_path):
    tasks = [("ok", 1, ""), ("die-once", 2, str(tmp_path / "m")), ("ok", 3, "")]
    results, replaced = run(tasks)
    assert results == {0: 2, 1: 4, 2: 6} and replaced == 1


def test_a_task_that_always_kills_its_worker_is_reported(tmp_path):
    tasks = [("ok", 1, ""), ("die", 2, str(tmp_path / "m")), ("ok", 3, "")]
    results, replaced = run(tasks)
    assert results[0] == 2 and results[2] == 6 and replaced == 2
    assert isinstance(results[1], WorkerFailure) and "died (exit code 9), 2 attempts" in results[1].reason


def test_a_hung_worker_is_replaced(tmp_path):
    start = time.monotonic()
    results, _ = run([("hang", 0, ""), *[("ok", i, "") for i in range(1, 6)]], timeout=1.0, retries=0)
    assert time.monotonic() - start < 30
    assert isinstance(results[0], WorkerFailure) and "hung" in results[0].reason
    assert [results[i] for i in range(1, 6)] == [2, 4, 6, 8, 10]


def test_a_long_task_that_keeps_working_is_not_taken_for_a_hang():
    """The limit measures a stall: a task busy for four times the limit (a loaded machine, a long file) finishes."""
    results, replaced = run([("slow", 1, "2.0"), ("ok", 2, "")], timeout=0.5, retries=0)
    assert results == {0: 2, 1: 4} and replaced == 0


def test_a_worker_killed_while_idle_is_replaced(tmp_path):
    pool = WorkerPool(work, 2, mp.get_context("fork"))
    try:
        assert dict(pool.map_unordered([("ok", 1, "")])) == {0: 2}
        for worker in pool.workers:
            worker.process.kill()
            worker.process.join()
        assert dict(pool.map_unordered([("ok", i, "") for i in range(4)])) == {i: 2 * i for i in range(4)}
    finally:
        pool.close()


def test_leaving_the_results_early_stops_the_tasks_still_running():
    pool = WorkerPool(work, 2, mp.get_context("fork"))
    try:
        results = pool.map_unordered([("ok", 1, ""), ("hang", 0, ""), ("hang", 0, "")])
        start = time.monotonic()
        assert next(results) == (0, 2)
        results.close()  # the workers still busy are replaced, so the next map gets answers at once
        assert dict(pool.map_unordered([("ok", i, "") for i in range(4)])) == {i: 2 * i for i in range(4)}
        assert time.monotonic() - start < 30
    finally:
        pool.close()
