"""A process pool that survives its workers: a crash, an out-of-memory kill or a hang costs one retry.

`multiprocessing.Pool` waits forever for the result of a worker that died, so one bad file could hang a
preprocessing run for good. Pebble's `ProcessPool` replaces a worker that died (the task's future raises
`ProcessExpired`) or ran past its timeout (the worker is stopped, the future raises `TimeoutError`); this module
adds the policy on top: such a task is given to a fresh worker once more, then reported as a `WorkerFailure`.
Pebble gives up on the whole pool when a worker dies while no task runs (an idle worker killed by the OOM
killer: "All workers expired"); its unfinished tasks are then handed to a fresh pool, at no attempt's cost.
Results arrive in completion order with their task index, while the caller is busy elsewhere (the encoder):
at most `capacity` tasks are in flight or waiting to be collected, which bounds the memory of loaded audio.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures import TimeoutError as TaskTimeout
from dataclasses import dataclass

from pebble import ProcessExpired, ProcessPool

from moss.worker_signals import deaf_to_group_stops

log = logging.getLogger(__name__)


@dataclass
class WorkerFailure:
    """A task whose worker died, hung or raised on every attempt."""

    reason: str


def _start_worker(initializer: Callable | None) -> None:
    # Workers outlive a scheduler's SIGTERM to the whole group, and end with their parent (moss.worker_signals).
    deaf_to_group_stops()
    if initializer is not None:
        initializer()


class WorkerPool:
    """`map_unordered(tasks)` over `workers` processes; every task yields a result or a WorkerFailure.

    Args:
        fn: a module-level function (pickled by reference) that should not raise.
        workers: processes.
        ctx: a multiprocessing context (fork or spawn).
        timeout: seconds one task may take before its worker is stopped.
        retries: further attempts after a worker died, hung or raised on a task.
        capacity: tasks in flight plus results not yet collected.
        initializer: run once in every worker process.
    """

    def __init__(
        self,
        fn: Callable,
        workers: int,
        ctx,
        timeout: float = 600.0,
        retries: int = 1,
        capacity: int | None = None,
        initializer: Callable | None = None,
    ):
        self.fn, self.timeout, self.retries = fn, timeout, retries
        self.capacity = capacity or 2 * workers
        self._settings = dict(max_workers=workers, initializer=_start_worker, initargs=(initializer,), context=ctx)
        self.pool = ProcessPool(**self._settings)
        self.replaced = 0  # workers lost to a death or a hang

    def close(self) -> None:
        """Stop every worker now (a task still running is abandoned)."""
        self.pool.stop()
        self.pool.join()

    def map_unordered(self, tasks: list) -> Iterator[tuple[int, object]]:
        """(task index, result or WorkerFailure) for every task, in completion order."""
        todo = deque((index, task, 0) for index, task in enumerate(tasks))
        running: dict = {}
        try:
            while todo or running:
                while todo and len(running) < self.capacity:
                    index, task, tried = todo.popleft()
                    if not self.pool.active:
                        self._restart(running, todo)
                    running[self.pool.schedule(self.fn, args=(task,), timeout=self.timeout)] = (index, task, tried)
                done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                if not done and not self.pool.active:
                    self._restart(running, todo)
                for future in done:
                    index, task, tried = running.pop(future)
                    try:
                        yield index, future.result()
                        continue
                    except ProcessExpired as err:
                        reason, self.replaced = f"loader process died (exit code {err.exitcode})", self.replaced + 1
                    except TaskTimeout:
                        reason = f"loader process hung (no result after {self.timeout:g} s)"
                        self.replaced += 1
                    except Exception as err:  # noqa: BLE001 - a loader bug: this record fails, the run goes on
                        reason = f"loader raised {type(err).__name__}: {err}"
                    if tried < self.retries:
                        log.warning("task %d: %s; retrying", index, reason)
                        todo.appendleft((index, task, tried + 1))
                    else:
                        yield index, WorkerFailure(f"{reason}, {tried + 1} attempts")
        finally:  # abandoned early: what still runs is stopped, not left to finish for nobody
            for future in running:
                future.cancel()

    def _restart(self, running: dict, todo: deque) -> None:
        """A fresh pool in place of one pebble gave up on; its unfinished tasks go back to the front of `todo`."""
        log.warning("the loader pool broke (a worker died between tasks); starting a fresh one")
        self.pool.stop()
        with contextlib.suppress(TimeoutError):
            self.pool.join(timeout=10)
        self.pool = ProcessPool(**self._settings)
        self.replaced += 1
        todo.extendleft(reversed([item for future, item in running.items() if not future.done()]))
        for future in [f for f in running if not f.done()]:
            del running[future]
