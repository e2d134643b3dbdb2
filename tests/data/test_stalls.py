"""The shard reader's time limit measures a stall of its source, never the time its consumer takes.

A real run consumes a large shard over many minutes (shuffling, packing, waiting for the training step); a
remote or piped shard may trickle in slowly. Neither may cut a shard. Only a source that stops sending is given
up, within the limit, reported as stalled with the byte offset, and none of its samples is judged bad.
"""

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from moss.data import tar_reader
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards

STALL_S = 0.4


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stall")
    write_shards(generate_samples(5, seed=3), folder, prefix="s", max_samples=100)
    path = folder / "s-000000.tar"
    return path, [s["__key__"] for s in tar_reader.samples(str(path))]


def _pipe_feeding(data: bytes, piece: int, pause: float, stop_at: int | None = None):
    """A pipe's read end, fed `data` in `piece`-byte writes `pause` s apart (silent forever from `stop_at`)."""
    read_fd, write_fd = os.pipe()
    stop = threading.Event()

    def feed():
        with os.fdopen(write_fd, "wb", buffering=0) as out:
            try:
                for start in range(0, len(data) if stop_at is None else stop_at, piece):
                    out.write(data[start : start + piece])
                    time.sleep(pause)
            except BrokenPipeError:  # the reader stopped at the archive's end marker, before its padding
                return
            if stop_at is not None:
                stop.wait()

    threading.Thread(target=feed, daemon=True).start()
    return os.fdopen(read_fd, "rb"), stop


@pytest.mark.parametrize("source", ["file", "pipe"])
def test_a_consumer_that_holds_the_reader_past_the_limit_reads_every_sample(shard, source, monkeypatch):
    path, keys = shard
    if source == "file":
        stream = open(path, "rb")
    else:
        stream, _ = _pipe_feeding(path.read_bytes(), 4096, 0.0)
    clock = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # any clock the reader might read: hours pass
    names = []
    with stream:
        for name, _ in tar_reader.members(stream, source, stall_s=STALL_S):
            names.append(name)
            clock[0] += 3 * 3600.0
            if len(names) <= 2:
                threading.Event().wait(2.5 * STALL_S)  # and really longer than the limit, for the first members
    assert {n.split(".", 1)[0] for n in names} == set(keys)


def test_a_shard_that_trickles_in_over_many_times_the_limit_is_read_whole(shard):
    path, keys = shard
    data = path.read_bytes()
    pieces = 100
    piece = -(-len(data.rstrip(b"\0")) // pieces)  # the members; the zero blocks after them are not waited for
    stream, _ = _pipe_feeding(data, piece, 6 * STALL_S / pieces)  # six times the limit, a piece each 24 ms
    started = time.monotonic()
    with stream:
        names = [name for name, _ in tar_reader.members(stream, "trickle", stall_s=STALL_S)]
    assert time.monotonic() - started > 4 * STALL_S
    assert {n.split(".", 1)[0] for n in names} == set(keys)


def test_a_source_that_stops_sending_is_reported_as_stalled_within_the_limit(shard):
    path, keys = shard
    data = path.read_bytes()
    half = len(data) // 2 // 512 * 512 + 100  # inside a member
    stream, stop = _pipe_feeding(data, half, 0.0, stop_at=half)
    started = time.monotonic()
    with pytest.raises(tar_reader.ShardStalled, match=rf"stalled: no byte came for {STALL_S:g} s \(at byte {half}\)"):
        list(tar_reader.members(stream, "stopped.tar", stall_s=STALL_S))
    assert time.monotonic() - started < STALL_S + 2
    stop.set()
    stream.close()


def test_a_stalled_pipe_shard_is_ended_and_none_of_its_samples_is_called_bad(shard):
    """Through `samples` and WebDataset's `pipe:` URLs: the command is killed, the partial sample is not yielded."""
    path, keys = shard
    data = path.read_bytes()
    half = len(data) // 2 + 100
    marker = f"stalled-{os.getpid()}-{time.monotonic_ns()}"
    script = (
        f"import sys, time; d = open({str(path)!r}, 'rb').read()[:{half}]; "
        f"sys.stdout.buffer.write(d); sys.stdout.flush(); time.sleep(3600)  # {marker}"
    )
    errors = []
    started = time.monotonic()
    got = list(
        tar_reader.samples(
            f'pipe:{sys.executable} -c "{script}"', handler=lambda e: errors.append(e) or True, stall_s=STALL_S
        )
    )
    assert time.monotonic() - started < STALL_S + 10
    assert len(errors) == 1 and isinstance(errors[0], tar_reader.ShardStalled), errors
    assert f"at byte {half}" in str(errors[0])
    assert got and [s["__key__"] for s in got] == keys[: len(got)]
    # every sample yielded is whole: the one the stall cut short is not passed on as a sample missing fields
    fields = {k for k in tar_reader.samples(str(path)).__next__() if not k.startswith("__")}
    assert all(fields <= set(s) for s in got)
    # the shell and the command it started are gone, not left sleeping
    time.sleep(0.2)
    alive = [p for p in Path("/proc").glob("[0-9]*") if marker.encode() in _cmdline(p)]
    assert alive == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
