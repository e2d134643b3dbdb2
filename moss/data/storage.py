"""Shards where large teams keep them: object storage (S3 and S3-compatible stores, GCS) and HTTP(S).

The store is fsspec's (s3fs for `s3://`: credentials, region and endpoint come from the standard AWS environment
variables and files, `AWS_ENDPOINT_URL` for an S3-compatible store such as MinIO, Ceph or SeaweedFS; gcsfs for
`gs://`). Our part is what a training stream needs on top: a prefix or glob listed through the store's API, an
object read in ranged requests that a transient failure (a reset connection, a 5xx, a restarting server) resumes
from the byte where it stopped, and an object written whole or not at all. Nothing here logs a credential: the
messages name URLs only.
"""

from __future__ import annotations

import io
import logging
import random
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from moss.errors import first_line

log = logging.getLogger(__name__)
SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")
BLOCK = 8 << 20  # bytes per ranged request: few requests per shard, little memory per reader
RETRIES = 8  # further tries of a failed request, 0.5 s to 15 s apart: about a minute in all
PERMANENT = {  # what no retry changes, in words
    FileNotFoundError: "no such object",
    PermissionError: "access denied (the store's credentials: AWS_ACCESS_KEY_ID/AWS_PROFILE, ~/.aws)",
    IsADirectoryError: "a prefix, not an object",
}


def is_remote(url: str | Path) -> bool:
    """A URL of a store (`s3://`, `gs://`, `https://`, ...), not a local path or a `pipe:` command."""
    return bool(SCHEME.match(str(url)))


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:  # e.g. gs:// without gcsfs installed
        raise OSError(f"{url}: cannot open this store ({first_line(err)})") from err


def retrying(call: Callable, what: str, retries: int = RETRIES):
    """`call()`, tried again with growing waits when it fails for a reason that may pass."""
    for attempt in range(retries + 1):
        try:
            return call()
        except tuple(PERMANENT) as err:
            words = next(w for kind, w in PERMANENT.items() if isinstance(err, kind))
            raise type(err)(f"{what}: {words}") from err
        except Exception as err:  # noqa: BLE001 - stores raise many kinds for a dropped connection or a 5xx
            if attempt == retries:
                raise OSError(f"{what}: {type(err).__name__}: {first_line(err)} ({attempt + 1} tries)") from err
            wait = min(15.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("%s: %s; trying again in %.1f s", what, first_line(err), wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def list_objects(url: str) -> list[str]:
    """The shard URLs of a remote spec: a glob (`s3://b/set/*.tar`), a prefix (`s3://b/set/`), or one object.

    HTTP(S) cannot be listed: its URLs are taken as given.
    """
    scheme = SCHEME.match(url)[1]
    if scheme in ("http", "https") or url.endswith(".tar") and not any(c in url for c in "*?["):
        return [url]
    fs, path = _fs(url)
    pattern = path if any(c in path for c in "*?[") else path.rstrip("/") + "/*.tar"
    found = retrying(lambda: fs.glob(pattern), f"listing {url}")
    return sorted(f"{scheme}://{p}" for p in found)


class ObjectStream(io.RawIOBase):
    """An object read front to back in ranged requests of `block` bytes.

    A failed request is retried from the byte where it stopped: a transient failure costs a wait, never a
    repeated or lost sample.
    """

    def __init__(self, url: str, block: int | None = None, retries: int = RETRIES):
        super().__init__()
        self.url, self.block, self.retries = url, block or BLOCK, retries
        self.fs, self.path = _fs(url)
        self.size = retrying(lambda: self.fs.size(self.path), f"{url}: size", retries)
        self.offset, self.buffer, self.at = 0, b"", 0  # the next byte to request; the last block; read up to

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.at == len(self.buffer) and (self.size is None or self.offset < self.size):
            end = self.offset + self.block if self.size is None else min(self.size, self.offset + self.block)
            what = f"{self.url}: bytes {self.offset}-{end}"
            self.buffer = retrying(lambda: self.fs.cat_file(self.path, start=self.offset, end=end), what, self.retries)
            if len(self.buffer) > end - self.offset:
                raise OSError(f"{what}: the server sent {len(self.buffer)} bytes; it does not answer ranged requests")
            self.offset, self.at = self.offset + len(self.buffer), 0
        size = len(self.buffer) - self.at if size is None or size < 0 else size
        data = self.buffer[self.at : self.at + size]
        self.at += len(data)
        return data

    read1 = read


def read_bytes(url: str) -> bytes:
    """A whole (small) object: a manifest, a record of progress."""
    fs, path = _fs(url)
    return retrying(lambda: fs.cat_file(path), f"reading {url}")


def exists(url: str) -> bool:
    """Whether the object `url` is there."""
    fs, path = _fs(url)
    return retrying(lambda: fs.exists(path), f"looking up {url}")


def size(url: str) -> int:
    """The object's size in bytes."""
    fs, path = _fs(url)
    return retrying(lambda: fs.size(path), f"{url}: size")


def write_object(url: str, write: Callable[[Path], None]) -> None:
    """Write `url` through `write(local_path)`, then upload it in one request: it appears whole or not at all."""
    path = url.rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="moss-upload-") as folder:
        local = Path(folder) / Path(path).name
        write(local)
        upload(local, url)


def upload(path: str | Path, url: str) -> None:
    """Upload the local file `path` to `url` in one request: the object appears whole or not at all."""
    fs, target = _fs(url)
    retrying(lambda: fs.put_file(str(path), target), f"uploading {url}")
