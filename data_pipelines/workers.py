"""A process pool that survives its workers: a crash, an out-of-memory kill or a hang costs one retry.

`multiprocessing.Pool` waits forever for the result of a worker that died, so one bad file could hang a
preprocessing run for good. Here each worker is sent at most `PREFETCH` tasks ahead and works on the first;
a manager thread watches the workers' pipes and process sentinels, gives a dead worker's current task (or
one that made no progress for `timeout` seconds) to a fresh worker once more, then reports it as a
`WorkerFailure`; the tasks queued behind it go back to the queue without counting an attempt. Results arrive
in completion order with their task index, while the caller is busy elsewhere (the encoder): at most
`capacity` tasks are in flight or waiting to be collected, which bounds the memory of loaded audio.

A hang is a stall, not a long task: a worker whose CPU time and bytes read and written (Linux's `/proc`) keep
changing is working, however long its task takes on a loaded machine; one blocked for `timeout` seconds (a read
that never returns, a lock, a sleep) is replaced. Where `/proc` is missing, `timeout` bounds each task's time.

Why not pebble or loky: pebble's workers take tasks from one shared pipe under a process-shared lock, so a
worker SIGKILLed while holding it (the OOM killer does not choose its moment) leaves every other worker waiting
for that lock for good, and its pool gives up entirely when a worker dies between tasks; under
`tests/data_pipelines/test_fuzz.py::test_killed_loader_workers_cost_a_retry_never_a_hang` a pebble pool hung
preprocessing (2026-12). loky fails every pending task when one worker dies and has no per-task timeout. Here
each worker has its own pipe, and nothing is shared that a killed worker could leave held.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait

from moss.worker_signals import deaf_to_group_stops

log = logging.getLogger(__name__)
PREFETCH = 2  # tasks sent ahead to each worker


@dataclass
class WorkerFailure:
    """A task whose worker died or hung on every attempt."""

    reason: str


def _serve(conn, fn: Callable, initializer: Callable | None, parent: int) -> None:
    # A forked worker holds inherited copies of the pipes' other ends, so a dead parent shows as no EOF and a
    # send can block forever: only the parent's pid tells, and `deaf_to_group_stops` watches it (and keeps the
    # worker alive through a scheduler's SIGTERM to the whole group; the pool stops workers itself).
    deaf_to_group_stops()
    if initializer is not None:
        initializer()
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(fn(task))


def _progress(pid: int) -> tuple | None:
    """What process `pid` has done so far: its CPU ticks and I/O counters (None where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        with open(f"/proc/{pid}/io", "rb") as f:
            counters = f.read()
    except (OSError, IndexError):
        return None
    return fields[11], fields[12], counters  # utime, stime (fields 14 and 15 of proc(5)), rchar, wchar, ...


class _Worker:
    def __init__(self, ctx, fn, initializer):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, fn, initializer, os.getpid()), daemon=True)
        self.process.start()
        child.close()
        self.tasks: deque[tuple[int, object]] = deque()  # sent, in order; the first is being worked on
        self.moved, self.progress = 0.0, None  # when the current task last made progress, and what it had done

    def begin(self) -> None:
        """The first task of `tasks` starts now."""
        self.moved, self.progress = time.monotonic(), _progress(self.process.pid)

    def stalled_for(self) -> float:
        """Seconds since the current task last made progress."""
        now, progress = time.monotonic(), _progress(self.process.pid)
        if progress is not None and progress != self.progress:
            self.moved, self.progress = now, progress
        return now - self.moved

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class WorkerPool:
    """`map_unordered(tasks)` over `workers` processes; every task yields a result or a WorkerFailure.

    Args:
        fn: a module-level function (pickled by reference) that should not raise.
        workers: processes.
        ctx: a multiprocessing context (fork or spawn).
        timeout: seconds a task may go without progress (no CPU time, no bytes read or written) before its
            worker is killed.
        retries: further attempts after a worker died or hung on a task.
        capacity: tasks in flight plus results not yet collected.
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
        self.fn, self.ctx, self.initializer = fn, ctx, initializer
        self.timeout, self.retries = timeout, retries
        self.capacity = capacity or 2 * workers
        self.workers = [_Worker(ctx, fn, initializer) for _ in range(workers)]
        self.replaced = 0
        self._manager: threading.Thread | None = None
        self._stop = threading.Event()

    def close(self) -> None:
        """Stop the manager (it would replace workers behind our back), then every worker."""
        if self._manager is not None:
            self._stop.set()
            self._manager.join()
        for worker in self.workers:
            worker.stop(kill=bool(worker.tasks))
        self.workers = []

    def map_unordered(self, tasks: list) -> Iterator[tuple[int, object]]:
        """(task index, result or WorkerFailure) for every task, in completion order."""
        out: queue.Queue = queue.Queue()
        room = threading.Semaphore(self.capacity)
        stop = self._stop = threading.Event()
        manager = self._manager = threading.Thread(
            target=self._manage, args=(list(tasks), out, room, stop), daemon=True
        )
        manager.start()
        try:
            for _ in range(len(tasks)):
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                room.release()
                yield item
        finally:
            stop.set()
            manager.join()

    # ------------------------------------------------------------------ manager thread
    def _manage(self, tasks: list, out: queue.Queue, room: threading.Semaphore, stop: threading.Event) -> None:
        try:
            todo = deque((i, task, 0) for i, task in enumerate(tasks))
            attempts: dict[int, int] = {}
            while not stop.is_set() and (todo or any(w.tasks for w in self.workers)):
                self._dispatch(todo, attempts, room)
                busy = [w for w in self.workers if w.tasks]
                if not busy:
                    stop.wait(0.05)  # waiting for the consumer to make room
                    continue
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.5)
                for position, worker in enumerate(list(self.workers)):
                    if not worker.tasks:
                        continue
                    if worker.conn in ready:
                        try:
                            result = worker.conn.recv()
                        except (EOFError, OSError):
                            pass  # died while sending: handled as a death below
                        else:
                            index, _ = worker.tasks.popleft()
                            worker.begin()
                            out.put((index, result))
                            continue
                    died = worker.process.sentinel in ready or not worker.process.is_alive()
                    if died or worker.stalled_for() > self.timeout:
                        self._fail(position, died, todo, attempts, out, room)
        except BaseException as err:  # noqa: BLE001 - the consumer re-raises it instead of waiting forever
            out.put(err)
        finally:  # abandoned early: workers still busy would answer the next map's tasks with old results
            for position, worker in enumerate(self.workers):
                if worker.tasks:
                    self._replace(position)

    def _dispatch(self, todo: deque, attempts: dict, room: threading.Semaphore) -> None:
        """Keep up to PREFETCH tasks queued at every worker, so none waits for the manager between tasks."""
        for position, worker in enumerate(self.workers):
            while len(worker.tasks) < PREFETCH and todo and room.acquire(blocking=False):
                index, task, tried = todo.popleft()
                attempts[index] = tried
                try:
                    worker.conn.send(task)
                except OSError:  # dead: this task never started, so it costs no attempt
                    todo.appendleft((index, task, tried))
                    room.release()
                    if not worker.tasks:
                        self._replace(position)  # died while idle
                    break  # else the main loop sees the death and handles the tasks it holds
                if not worker.tasks:
                    worker.begin()
                worker.tasks.append((index, task))

    def _fail(self, position: int, died: bool, todo: deque, attempts: dict, out, room) -> None:
        """Replace a dead or hung worker: its current task is retried or reported, the queued ones go back."""
        worker = self.workers[position]
        self._replace(position)
        if not worker.tasks:
            return
        (index, task), queued = worker.tasks[0], list(worker.tasks)[1:]
        for queued_index, queued_task in reversed(queued):  # never started: no attempt counted
            todo.appendleft((queued_index, queued_task, attempts[queued_index]))
            room.release()
        reason = (
            f"loader process died (exit code {worker.process.exitcode})"
            if died
            else f"loader process hung (no progress for {self.timeout:g} s)"
        )
        if attempts[index] < self.retries:
            log.warning("task %d: %s; retrying", index, reason)
            room.release()  # taken again when the retry is dispatched
            todo.appendleft((index, task, attempts[index] + 1))
        else:  # the failure keeps the task's slot until it is collected, like a result
            out.put((index, WorkerFailure(f"{reason}, {attempts[index] + 1} attempts")))

    def _replace(self, position: int) -> None:
        """Kill the worker at `position` (if still alive) and start a fresh one in its place."""
        self.workers[position].stop(kill=True)
        self.workers[position] = _Worker(self.ctx, self.fn, self.initializer)
        self.replaced += 1
