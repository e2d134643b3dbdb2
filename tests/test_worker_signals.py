"""Workers live through a scheduler's SIGTERM to the whole group, and still end when their parent says so."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from moss.worker_signals import deaf_to_group_stops
from tests.conftest import REPO


def _worker(ready) -> None:
    deaf_to_group_stops()
    ready.set()
    while True:
        time.sleep(0.1)


def test_a_group_sigterm_is_survived_and_the_parents_terminate_is_obeyed():
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    worker = ctx.Process(target=_worker, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(30)
    for sig in ("TERM", "INT", "USR1"):  # sent by another process, as a scheduler's `kill -TERM -<pgid>` is
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(1.5)
    assert worker.is_alive()
    worker.terminate()  # SIGTERM from the parent: what multiprocessing does at exit
    worker.join(10)
    assert not worker.is_alive() and worker.exitcode == 0


@pytest.mark.slow
def test_a_worker_ends_when_its_parent_is_gone(tmp_path):
    pid_file = tmp_path / "pid"
    script = (
        "import multiprocessing as mp, sys, time\n"
        "from tests.test_worker_signals import _orphan\n"
        "p = mp.get_context('fork').Process(target=_orphan, args=(sys.argv[1],)); p.start(); time.sleep(2)\n"
        "import os; os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(pid_file)], check=True, timeout=60, cwd=REPO)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the worker outlived its parent")


def _orphan(pid_file: str) -> None:
    deaf_to_group_stops()
    open(pid_file, "w").write(str(os.getpid()))
    while True:
        time.sleep(0.1)
