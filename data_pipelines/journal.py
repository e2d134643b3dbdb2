"""The resume journal of the data tools: what an output folder is made from, and which units of work are done.

Preprocessing (units: shards) and transcription (units: recordings) keep theirs the same way. `plan.json` holds
what the outputs depend on (`made_from`: the inputs' SHA-256, the codec or model files, every setting of the
steps) and the split of the work fixed by the first run (`split`), so that a rerun on another number of devices
agrees with it. A unit is done once its record is on disk: written last and atomically, after the unit's own
files, so a kill leaves each unit done or not begun. A rerun made from the same things skips the done units;
otherwise `changes()` says what differs, and the tool decides: preprocessing refuses (its shards would mix two
sets), transcription starts again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moss.outputs import atomic_write

PLAN = "plan.json"


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: str | Path) -> dict:
    """A large file (a checkpoint) by path, size and modification time: one replaced under its name differs."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Journal:
    """The journal of the output folder `folder`, for a run whose outputs are made from `made_from` (plain JSON)."""

    def __init__(self, folder: str | Path, made_from: dict):
        self.folder, self.made_from = Path(folder), made_from
        self.saved = self.done(PLAN)
        if self.saved is not None and "sources" in self.saved:  # preprocessing's plan before the journal
            old = self.saved
            made = {**(old["sources"] or made_from), "records_per_shard": old["records_per_shard"]}
            self.saved = {"made_from": made, "split": {"num_slots": old["num_slots"]}}

    def changes(self) -> list[str]:
        """What the folder's outputs were made from that differs now, in words (none for a new folder)."""
        if self.saved is None:
            return []
        old, new, changed = self.saved.get("made_from") or {}, self.made_from, []
        for key in dict.fromkeys([*new, *old]):
            before, now = old.get(key), new.get(key)
            if key == "inputs" and isinstance(before, dict) and isinstance(now, dict):
                for file in dict.fromkeys([*now, *before]):
                    state = "added" if file not in before else "removed" if file not in now else "changed"
                    changed += [f"{Path(file).name} {state}"] if before.get(file) != now.get(file) else []
                if not changed and list(before) != list(now):
                    changed.append("inputs reordered")
            elif before != now:
                changed.append(key)
        return changed

    def begin(self, split: dict | None = None) -> dict:
        """The split recorded by the first run; a new folder (or one made from other things) records `split`."""
        if self.saved is not None and not self.changes():
            return self.saved.get("split") or {}
        self.saved = {"made_from": self.made_from, "split": split or {}}
        self.finish(PLAN, self.saved)
        return self.saved["split"]

    def done(self, name: str) -> dict | None:
        """The record `name` of a done unit, or None (not done, or cut short before the atomic write existed)."""
        try:
            record = json.loads((self.folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def finish(self, name: str, record: dict) -> Path:
        """Record a unit as done (its files are written): one atomic write."""
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, ensure_ascii=False) + "\n"
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
