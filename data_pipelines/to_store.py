"""Preprocessing into object storage (`output_dir=s3://bucket/prefix`): shards made locally, published whole.

The run writes into a local work folder exactly as it writes a local `output_dir` (`work_dir`; by default a cache
folder named after the URL), while a publisher uploads each shard it finishes: the tar first, then the shard's
record, which is what says a shard is done. Each is one upload, so an object appears whole or not at all; the
local tar is then deleted. The plan, manifests and skip reports follow at the end. A rerun, on this machine or
another, first fetches the records from the store and redoes only the shards that were not published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

from moss.data import storage
from moss.outputs import RECORD, OutputFolder

log = logging.getLogger(__name__)
SHARD_RECORD = re.compile(r"^\d{5}-\d{6}\.tar\.json$")  # `<shard>.json`: the shard is done
SMALL = re.compile(r"^(plan\.json|\d{5}-\d{6}\.tar\.json|manifest-\d{5}\.json|skipped-\d{5}\.jsonl)$")  # fetched back


def work_folder(output_dir: str | None, work_dir: str | None = None) -> str:
    """Where a run writes before publishing: `output_dir` itself when local, else `work_dir` or a cache folder."""
    if not output_dir or not storage.is_remote(output_dir):
        return output_dir or "."
    if work_dir:
        return str(work_dir)
    digest = hashlib.sha1(output_dir.rstrip("/").encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(cache / "moss" / "preprocess" / digest)


def store_problems(url: str, setting: str = "output_dir") -> list[str]:
    """Why preprocessing may not write under the prefix `url`: it holds objects that preprocessing did not write."""
    url = url.rstrip("/")
    names = sorted(u.rsplit("/", 1)[1] for u in storage.list_objects(f"{url}/*"))
    if not names:
        return []
    if RECORD in names and json.loads(storage.read_bytes(f"{url}/{RECORD}")).get("tool") == "preprocess":
        return []  # its own earlier output: continued
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    return [f"{setting}={url} holds objects that preprocessing did not write ({shown}); choose a new prefix"]


class Publisher:
    """Uploads the shards a local run finishes, from a thread, while it runs; a context manager around the run."""

    def __init__(self, url: str, local: Path, every_s: float = 2.0):
        self.url, self.local, self.every_s = url.rstrip("/"), Path(local), every_s
        self.published: set[str] = set()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="shard-publisher")

    def __enter__(self) -> Publisher:
        """Fetch the store's records of earlier runs (what is done), mark the prefix as preprocessing's, start."""
        OutputFolder(self.local, "preprocess", resumable=True).check().open(lock=False)  # what it fetches is its own
        for url in storage.list_objects(f"{self.url}/*.json*"):
            name = url.rsplit("/", 1)[1]
            if SMALL.match(name):
                if not (self.local / name).exists():
                    (self.local / name).write_bytes(storage.read_bytes(url))
                if SHARD_RECORD.match(name):
                    self.published.add(name)
        if not storage.exists(f"{self.url}/{RECORD}"):
            record = json.dumps({"tool": "preprocess", "files": None}).encode()
            storage.write_object(f"{self.url}/{RECORD}", lambda path: path.write_bytes(record))
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.publish_shards()
            except BaseException as err:  # noqa: BLE001 - raised in the run's thread at the end
                self.error = err
                return

    def publish_shards(self) -> None:
        """Upload every finished shard not yet in the store: its tar, then its record; then free the tar."""
        for record in sorted(self.local.glob("[0-9]*-[0-9]*.tar.json")):
            if record.name in self.published or not SHARD_RECORD.match(record.name):
                continue
            tar = record.with_suffix("")
            if tar.exists():  # none when the shard's records held no usable sample
                storage.upload(tar, f"{self.url}/{tar.name}")
            storage.upload(record, f"{self.url}/{record.name}")
            self.published.add(record.name)
            tar.unlink(missing_ok=True)
            log.info("published %s/%s", self.url, tar.name)

    def __exit__(self, kind, err, trace) -> None:
        """Publish what is finished (also after a failure: the rerun then continues from it), then the rest."""
        self.stop.set()
        self.thread.join()
        self.publish_shards()
        if self.error is not None:
            raise self.error
        if kind is None:
            for path in sorted(self.local.iterdir()):
                if SMALL.match(path.name) and not SHARD_RECORD.match(path.name):
                    storage.upload(path, f"{self.url}/{path.name}")
