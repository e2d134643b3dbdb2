"""Shards are untrusted input: a tar reader whose every read is bounded before it happens.

Python's `tarfile` (which WebDataset uses) trusts what headers claim: it reads a pax header of whatever size
its header gives, inflates gzip'd "tars" without a limit, and reads a member whole before anyone can look at
its size. A 10 kB file can thus stall a loader worker or exhaust its memory. This reader parses the tar
format itself (ustar, pax and GNU long names, the formats tar and WebDataset's writers produce) and, per shard:

* refuses compressed shards (gzip, bzip2, xz, zstd) by their magic bytes; ours are plain tar;
* checks every header's checksum, and a member's size against `max_member_bytes` *before* reading it;
* reads in bounded blocks and gives up after `deadline_s` seconds;
* skips the data of members no one asked for (`fields`) with a seek where the file allows it.

Members are grouped into samples as WebDataset does (`dir/key.ext`: consecutive members with the same key;
the extension lower-cased); each sample is a dict `{"__key__", "__url__", ext: bytes, ...}`.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator

import webdataset as wds

BLOCK = 512
MAX_MEMBER_BYTES = 64 << 20  # codes of 4 h of audio are 2.9 MB; anything near this is not ours
MAX_HEADER_BYTES = 1 << 20  # pax and GNU long-name records
DEADLINE_S = 600.0  # one shard; a 1 GB shard reads in seconds from a local disk
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's key/extension split


class ShardError(ValueError):
    """A shard that cannot be read (further); the message says where and why."""


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


class _Reader:
    """Bounded reads from a shard's byte stream, with its deadline."""

    def __init__(self, stream, url: str, deadline_s: float):
        self.stream, self.url, self.offset = stream, url, 0
        self.deadline = time.monotonic() + deadline_s
        self.deadline_s = deadline_s
        try:
            self.size = stream.seek(0, io.SEEK_END) if stream.seekable() else None  # for skips past the end
            if self.size is not None:
                stream.seek(0)
        except (AttributeError, OSError, ValueError):
            self.size = None

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ShardError(f"{self.url}: reading took more than {self.deadline_s:g} s (at byte {self.offset})")

    def read(self, size: int, chunk: int = 1 << 20) -> bytes:
        parts, left = [], size
        while left > 0:
            self._check_time()
            data = self.stream.read(min(chunk, left))
            if not data:
                break
            parts.append(data)
            left -= len(data)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def exactly(self, size: int, what: str) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise ShardError(f"{self.url}: truncated inside {what} (at byte {self.offset})")
        return data

    def skip(self, size: int, what: str) -> None:
        if self.size is not None:
            self._check_time()
            if self.offset + size > self.size:
                raise ShardError(f"{self.url}: truncated inside {what} (ends at byte {self.size})")
            self.stream.seek(self.offset + size)
            self.offset += size
        else:
            left = size
            while left > 0:
                left -= len(self.exactly(min(left, 1 << 20), what))


def members(
    stream,
    url: str,
    fields: Callable[[str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    deadline_s: float = DEADLINE_S,
) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of every regular file in the tar `stream`; data is None for names `fields` rejects.

    Raises:
        ShardError: compressed, corrupt or truncated data, a member over `max_member_bytes`, or past the deadline.
    """
    reader = _Reader(stream, url, deadline_s)
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


def open_shard(url: str):
    """A binary stream of a shard: a local path, or any URL WebDataset opens (`pipe:`, `s3://`, `https://`)."""
    if "://" in url or url.startswith("pipe:"):
        return wds.gopen(url)
    return open(url, "rb")


def samples(
    url: str,
    handler: Callable[[Exception], bool] | None = None,
    fields: Callable[[str], bool] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    deadline_s: float = DEADLINE_S,
) -> Iterator[dict]:
    """WebDataset-style samples of one shard.

    On an error `handler(err)` is called and the shard ends there (its samples so far stand); without a handler
    the error is raised.

    `fields(ext)` (optional) selects the extensions whose data is read; the others are skipped unread.
    """
    current: dict | None = None
    want = None if fields is None else (lambda name: fields(_split(name)[1] if _split(name) else ""))
    try:
        with open_shard(url) as stream:
            for name, data in members(stream, url, want, max_member_bytes, deadline_s):
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
    if current is not None:  # also when the shard broke inside it: a sample missing fields is reported by key
        yield current


def _split(name: str) -> tuple[str, str] | None:
    m = _KEY_EXT.match(name)
    return None if m is None else (m.group(1), m.group(2).lower())
