"""Shards are untrusted input: a tar reader whose every read is bounded before it happens.

Python's `tarfile` (which WebDataset uses) trusts what headers claim: it reads a pax header of whatever size
its header gives, inflates gzip'd "tars" without a limit, and reads a member whole before anyone can look at
its size. A 10 kB file can thus stall a loader worker or exhaust its memory. This reader parses the tar
format itself (ustar, pax and GNU long names, the formats tar and WebDataset's writers produce) and, per shard:

* refuses compressed shards (gzip, bzip2, xz, zstd) by their magic bytes; ours are plain tar;
* checks every header's checksum, and a member's size against `max_member_bytes` *before* reading it;
* reads in bounded blocks; a stream that sends no byte for `stall_s` seconds is given up as stalled, with the
  byte offset (never the time the consumer holds the generator: a shard consumed over hours is read whole);
* skips the data of members no one asked for (`fields`) with a seek where the file allows it.

Members are grouped into samples as WebDataset does (`dir/key.ext`: consecutive members with the same key;
the extension lower-cased); each sample is a dict `{"__key__", "__url__", ext: bytes, ...}`.
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator

from moss.data import storage

BLOCK = 512
MAX_MEMBER_BYTES = 64 << 20  # codes of 4 h of audio are 2.9 MB; anything near this is not ours
MAX_HEADER_BYTES = 1 << 20  # pax and GNU long-name records
STALL_S = 600.0  # seconds a stream may send nothing; a live source sends something far sooner
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's key/extension split


class ShardError(ValueError):
    """A shard that cannot be read (further); the message says where and why."""


class ShardStalled(ShardError):
    """A shard whose source stopped sending: its data may be good, so no sample of it is judged bad."""


def _octal(field: bytes, what: str, offset: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large numbers
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardError(f"corrupt tar header at byte {offset} ({what} {field!r} is not a number)") from None


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip(b" \0")
    try:
        expected = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if expected == unsigned:
        return True
    high = sum(1 for b in header[:148] + header[156:] if b > 127)  # some old writers summed signed bytes
    return expected == unsigned - 256 * high


def _pax(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax extended header (`<length> <key>=<value>` + newline each)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length].rstrip(b"\n").partition(b"=")
        records[key] = value
        pos += length
    return records


class _Prefetch:
    """Reads a stream ahead in a thread, so that a wait for bytes can be bounded and nothing else is.

    The thread keeps at most `depth` chunks ready; the reader's clock runs only while it waits for the next
    one, so a source that trickles is read in full and a consumer that holds the generator costs nothing.
    """

    def __init__(self, read: Callable[[int], bytes], release: Callable[[], None], chunk=1 << 20, depth=4):
        self.chunks: queue.Queue = queue.Queue(maxsize=depth)
        self.closed = threading.Event()
        self.read, self.release, self.chunk = read, release, chunk
        threading.Thread(target=self._run, daemon=True, name="shard-prefetch").start()

    def _run(self) -> None:
        try:
            while not self.closed.is_set():
                data = self.read(self.chunk)
                self._put(data)
                if not data:
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the reader, which raises it in its own thread
            self._put(err)
        finally:
            self.release()

    def _put(self, item) -> None:
        while not self.closed.is_set():
            try:
                self.chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, stall_s: float) -> bytes | None:
        """The next chunk (b"" at the end), or None when none came for `stall_s` seconds."""
        try:
            item = self.chunks.get(timeout=stall_s)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


def _regular_file(stream) -> bool:
    if isinstance(stream, io.BytesIO):
        return True
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _raw_read(stream) -> tuple[Callable[[int], bytes], Callable[[], None]]:
    """A read that returns what has come without waiting to fill its size, and how to let its source go.

    A file descriptor is read with `os.read` on a copy of its own: a thread blocked in a buffered read would hold
    the buffer's lock (closing the stream would wait for the stalled source), and a thread still reading the
    original number after the stream closed could read a file that number was given to next. A `pipe:` command
    is read from its stdout.
    """
    source = stream.stream if isinstance(stream, _Command) else stream
    try:
        fd = os.dup(source.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return getattr(source, "read1", None) or source.read, lambda: None
    return (lambda size: os.read(fd, size)), (lambda: os.close(fd))


class _Reader:
    """Bounded reads from a shard's byte stream; a stream that stalls for `stall_s` is given up.

    A regular file is read directly (and skipped with seeks). Any other stream (a pipe, a socket, a URL) is
    read ahead by a `_Prefetch` thread, one raw read at a time, so a wait for bytes can be timed.
    """

    def __init__(self, stream, url: str, stall_s: float):
        self.stream, self.url, self.offset, self.stall_s = stream, url, 0, stall_s
        self.size = None
        self.ahead, self.pending, self.stalled = None, b"", False
        if _regular_file(stream):
            self.size = stream.seek(0, io.SEEK_END)  # for skips past the end
            stream.seek(0)
        else:
            self.ahead = _Prefetch(*_raw_read(stream))

    def _next_chunk(self) -> bytes:
        data = self.ahead.get(self.stall_s)
        if data is None:
            self.stalled = True
            raise ShardStalled(
                f"{self.url}: stalled: no byte came for {self.stall_s:g} s (at byte {self.offset + len(self.pending)})"
            )
        return data

    def read(self, size: int, chunk: int = 1 << 20) -> bytes:
        if self.ahead is None:
            parts, left = [], size
            while left > 0:
                data = self.stream.read(min(chunk, left))
                if not data:
                    break
                parts.append(data)
                left -= len(data)
            data = b"".join(parts)
        else:
            parts, have = [self.pending], len(self.pending)
            while have < size and (data := self._next_chunk()):
                parts.append(data)
                have += len(data)
            joined = b"".join(parts)
            data, self.pending = joined[:size], joined[size:]
        self.offset += len(data)
        return data

    def exactly(self, size: int, what: str) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise ShardError(f"{self.url}: truncated inside {what} (at byte {self.offset})")
        return data

    def skip(self, size: int, what: str) -> None:
        if self.size is not None:
            if self.offset + size > self.size:
                raise ShardError(f"{self.url}: truncated inside {what} (ends at byte {self.size})")
            self.stream.seek(self.offset + size)
            self.offset += size
        else:
            left = size
            while left > 0:
                left -= len(self.exactly(min(left, 1 << 20), what))

    def close(self) -> None:
        """Stop reading ahead; a stalled command is ended, so that closing it does not wait for it."""
        if self.ahead is None:
            return
        self.ahead.closed.set()
        if not self.stalled:
            return
        if isinstance(self.stream, _Command):
            self.stream.kill()


def members(
    stream,
    url: str,
    fields: Callable[[str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    stall_s: float = STALL_S,
) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of every regular file in the tar `stream`; data is None for names `fields` rejects.

    Raises:
        ShardError: compressed, corrupt or truncated data, or a member over `max_member_bytes`.
        ShardStalled: the stream sent nothing for `stall_s` seconds.
    """
    reader = _Reader(stream, url, stall_s)
    try:
        yield from _members(reader, url, fields, max_member_bytes)
    finally:
        reader.close()


def _members(reader: _Reader, url: str, fields, max_member_bytes: int) -> Iterator[tuple[str, bytes | None]]:
    long_name: str | None = None
    pax_size: int | None = None  # a pax `size` record overrides the next header's size field
    first = True
    while True:
        header = reader.read(BLOCK)
        if first:
            for magic, kind in COMPRESSED.items():
                if header.startswith(magic):
                    raise ShardError(f"{url}: a {kind}-compressed file; shards must be plain (uncompressed) tar")
            first = False
        if len(header) == 0 or header == bytes(BLOCK):
            return  # end of archive (two zero blocks, or a writer that stopped after the last member)
        if len(header) < BLOCK:
            raise ShardError(f"{url}: truncated tar header at byte {reader.offset - len(header)}")
        start = reader.offset - BLOCK
        if not _checksum_ok(header):
            raise ShardError(f"{url}: corrupt tar header at byte {start} (checksum mismatch)")
        size = _octal(header[124:136], "size", start)
        kind = header[156:157]
        if pax_size is not None and kind not in (b"x", b"g"):
            size, pax_size = pax_size, None
        padded = -(-size // BLOCK) * BLOCK
        if size < 0:
            raise ShardError(f"{url}: tar header at byte {start} gives a negative size")
        if kind in (b"x", b"g", b"L", b"K"):
            if size > MAX_HEADER_BYTES:
                raise ShardError(
                    f"{url}: an extended tar header at byte {start} claims {size} bytes (at most {MAX_HEADER_BYTES})"
                )
            data = reader.exactly(padded, "an extended header")[:size]
            if kind == b"x":
                records = _pax(data)
                if b"path" in records:
                    long_name = records[b"path"].decode("utf-8", "surrogateescape")
                if b"size" in records:
                    try:
                        pax_size = int(records[b"size"])
                    except ValueError:
                        raise ShardError(
                            f"{url}: pax header at byte {start} gives a size that is not a number"
                        ) from None
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = long_name or _ustar_name(header)
        long_name = None
        if kind not in (b"0", b"\0", b"7"):  # directories, links, devices: no sample data
            reader.skip(padded, f"member {name}")
            continue
        if size > max_member_bytes:
            raise ShardError(
                f"{url}: member {name} claims {size} bytes (more than {max_member_bytes}); not a shard of ours"
            )
        if fields is not None and not fields(name):
            reader.skip(padded, f"member {name}")
            yield name, None
            continue
        data = reader.exactly(padded, f"member {name}")[:size]
        yield name, data


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


class _Command:
    """A `pipe:` shard: a shell command's stdout, in a process group of its own.

    Ending the group ends the shell's children too. The exit status is checked when the stream is closed.
    """

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, start_new_session=True)
        self.stream, self.killed = self.proc.stdout, False

    def fileno(self) -> int:
        return self.stream.fileno()

    def kill(self) -> None:
        self.killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self.stream.close()
        try:
            status = self.proc.wait(timeout=5)  # it ended, or ends on SIGPIPE at its next write
        except subprocess.TimeoutExpired:  # left early, and it sends nothing: nothing more is wanted of it
            self.kill()
            status = self.proc.wait()
        if status not in (0, 141, -signal.SIGPIPE) and not self.killed:
            raise OSError(f"pipe:{self.command}: exit status {status}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str):
    """A binary stream of a shard: a local path, a `pipe:` command, or a store's URL (`moss.data.storage`)."""
    if url.startswith("pipe:"):
        return _Command(url[len("pipe:") :])
    if storage.is_remote(url):
        return storage.ObjectStream(url)
    return open(url, "rb")


def samples(
    url: str,
    handler: Callable[[Exception], bool] | None = None,
    fields: Callable[[str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    stall_s: float = STALL_S,
) -> Iterator[dict]:
    """WebDataset-style samples of one shard.

    On an error `handler(err)` is called and the shard ends there (its samples so far stand); without a handler
    the error is raised. A sample the error cut short is yielded too (its missing fields are reported by key),
    except after a stall: its bytes were good, they just stopped coming.

    `fields(ext)` (optional) selects the extensions whose data is read; the others are skipped unread.
    """
    current: dict | None = None
    want = None if fields is None else (lambda name: fields(_split(name)[1] if _split(name) else ""))
    try:
        with open_shard(url) as stream:
            for name, data in members(stream, url, want, max_member_bytes, stall_s):
                parts = _split(name)
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if data is not None:
                    current[ext] = data
    except (ShardError, OSError, EOFError) as err:
        if handler is None or not handler(err):
            raise
        if isinstance(err, ShardStalled):
            return
    if current is not None:  # also when the shard broke inside it: a sample missing fields is reported by key
        yield current


def _split(name: str) -> tuple[str, str] | None:
    m = _KEY_EXT.match(name)
    return None if m is None else (m.group(1), m.group(2).lower())
