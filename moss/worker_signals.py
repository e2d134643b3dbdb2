"""Worker processes and the stop signals a scheduler sends to a whole process group.

SLURM, Kubernetes, `timeout` and `kill -TERM -<pgid>` signal every process of a job, workers included. A data
worker that died on SIGTERM would fail the step its trainer is about to checkpoint, or be reported as a failed
record; so workers ignore Ctrl-C and SIGUSR1, and take SIGTERM only from their parent (which uses it to stop
them, as `multiprocessing` does at exit). SIGTERM is blocked in every thread of the worker and collected by one
thread, which reads the sender's pid (`sigtimedwait`): the parent's ends the worker, anyone else's is dropped.
The same thread ends the worker once its parent is gone.
"""

from __future__ import annotations

import os
import signal
import threading


def deaf_to_group_stops() -> None:
    """Call first thing in a worker process, before it starts any thread (threads inherit the blocked signal)."""
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="stop-signals").start()


def _watch(parent: int) -> None:
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        if (info is not None and info.si_pid == parent) or os.getppid() != parent:
            os._exit(0)
