"""Output folders by one rule: a tool writes into a new or empty folder, or one it made itself.

A folder a tool made holds its record (`.moss-outputs.json`: the tool and the names it wrote). Anything else in a
folder, the user's files, refuses it: they are never touched. An earlier output of the tool is continued by a
tool that resumes (preprocessing, transcription), replaced with `overwrite=true` by the others, else refused.
Every file reaches its name by `os.replace` from a temporary one (`atomic_write`), so a kill leaves the old file
or the new one, never a cut one; a lock (`filelock`) refuses a second writer of the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock

from moss.errors import ConfigError

RECORD = ".moss-outputs.json"
LOCK = ".moss-outputs.lock"
STAGING = ".moss-staging"  # a whole output is written here, inside the folder (same file system), then moved out
REPLACED = ".moss-replaced"  # where an earlier output waits while the new one is moved into place


TEMPORARY = ".*.moss-tmp*"  # fnmatch pattern of `atomic_write`'s temporary names


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` with a temporary path beside `path`, then move it onto `path` in one step.

    The one tmp-then-rename of the project. The temporary name is fixed per path (`.<stem>.moss-tmp<suffix>`: hidden,
    so shard globs and listings pass it over; the suffix kept, as writers infer formats from it), so a write
    killed half-way leaves at most one, which the next write of that path replaces. The file is on disk (fsync)
    before it takes the name, so a crash or a full disk leaves the old file whole, never a cut one. Each path has
    one writer at a time: tools lock their folders, and ranks write disjoint names.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.moss-tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as done:
            os.fsync(done.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in REFUSED_WRITES:
            err.filename = str(path)  # the file the user knows, not its temporary name
        raise
    except Exception as err:
        # A C library's write error often carries no errno (libsndfile says "System error."); a folder with
        # (almost) no space left says what it was.
        if refused_errno(err) is None and _space_left(path.parent) < FULL_BELOW:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken for a full disk


def _space_left(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return FULL_BELOW


# What the disk answered when it refused a write, in words (an OSError's errno).
REFUSED_WRITES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def refused_errno(err: BaseException | None) -> int | None:
    """The errno of a write the disk refused behind `err` (an OSError, or a Rust library's "os error N")."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in REFUSED_WRITES:
            return err.errno
        if (found := re.search(r"\(os error (\d+)\)", str(err))) and int(found[1]) in REFUSED_WRITES:
            return int(found[1])
        err = err.__cause__ or err.__context__
    return None


def refused_write(err: BaseException | None) -> str | None:
    """One line for a write the disk refused (full, read-only, not ours) behind `err`, else None.

    The line names the file, the space left in its folder and, where the writer knew it, the space it needed.
    """
    code = refused_errno(err)
    while code is not None and err is not None and not (isinstance(err, OSError) and err.errno == code):
        err = err.__cause__ or err.__context__
    if code is not None and err is None:  # a library's error that only quotes the errno: the file is unknown
        err = OSError(code, os.strerror(code))
    while err is not None:
        if isinstance(err, OSError) and err.errno in REFUSED_WRITES and (err.filename or err.errno == errno.ENOSPC):
            where = Path(str(err.filename)) if err.filename else None
            folder = where.parent if where is not None and not where.is_dir() else where
            writing = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
            line = f"{'cannot write ' if writing else ''}{where or 'an output'}: {REFUSED_WRITES[err.errno]}"
            if err.errno in (errno.ENOSPC, errno.EDQUOT) and folder is not None:
                with contextlib.suppress(OSError):
                    line += f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder})"
            needed = getattr(err, "needed_bytes", None)
            if needed:
                line += f"; it needs {needed / 2**20:.1f} MiB"
            return line + "; free space or choose another folder, then rerun (finished work is kept)"
        err = err.__cause__ or err.__context__
    return None


def writable_folder_problem(path: Path, setting: str) -> str | None:
    """Why `path` cannot be an output folder (a file, or not writable), as a message naming `setting`."""
    if path.exists() and not path.is_dir():
        return f"{setting}={path} is a file, not a folder; give a folder path (it is created if missing)"
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{setting}={path}: {existing} is a file, so the folder cannot be created; give another path"
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return f"{setting}={path}: {existing} is not writable; give a folder you can write to"
    return None


class OutputFolder:
    """The folder `path` as `tool`'s output folder, under the module's rule.

    Args:
        path: the folder (created by the first write).
        tool: the writing tool's name, kept in the record (another tool's record counts as the user's files).
        overwrite: the user's `overwrite=true`: an earlier output of the tool is replaced.
        resumable: the tool continues its earlier output (every file in a folder it made counts as its own).
        setting: the setting that named the folder, for messages.
    """

    def __init__(
        self, path: str | Path, tool: str, overwrite: bool = False, resumable: bool = False, setting: str = "output_dir"
    ):
        self.path, self.tool, self.overwrite, self.resumable = Path(path), tool, bool(overwrite), resumable
        self.setting, self.log, self.held = setting, f"{tool}.log", None  # held: the lock, once opened
        self.files = self._recorded()  # names of the tool's earlier output; None: the whole folder is its own

    def _recorded(self) -> set[str] | None:
        try:
            record = json.loads((self.path / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        if not isinstance(record, dict) or record.get("tool") != self.tool:
            return set()
        files = record.get("files")
        if files is None:  # a resumable tool's folder: all of it is the tool's
            return None
        return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()

    def entries(self) -> list[str]:
        """The folder's names, less the record, the lock, staging and `atomic_write`'s temporaries."""
        if not self.path.is_dir():
            return []
        return sorted(
            n for n in os.listdir(self.path) if not n.startswith(".moss-") and not fnmatch.fnmatch(n, TEMPORARY)
        )

    def problems(self) -> list[str]:
        """Every reason to refuse the folder, each with its fix (empty: it may be written).

        The tool's log (`<tool>.log`, which Hydra writes there) is its own and no earlier output.
        """
        if problem := writable_folder_problem(self.path, self.setting):
            return [problem]
        names = [n for n in self.entries() if n != self.log]
        foreign = [n for n in names if self.files is not None and n not in self.files]
        if foreign:
            return [
                f"{self.setting}={self.path} holds {len(foreign)} file(s) that {self.tool} did not write "
                f"({_listing(foreign)}); choose a new or empty folder, or move them away (overwrite=true never "
                f"replaces files of others)"
            ]
        if names and not self.overwrite and not self.resumable:
            return [
                f"{self.setting}={self.path} holds an earlier {self.tool} output ({_listing(names)}); add "
                f"overwrite=true to replace it, or choose a new folder"
            ]
        return []

    def check(self) -> OutputFolder:
        """Raise one ConfigError when the folder may not be written."""
        if problems := self.problems():
            raise ConfigError("\n".join(problems))
        return self

    def open(self, clear: bool = True, lock: bool = True) -> OutputFolder:
        """Make, lock, check again and record the folder as the tool's, once, before its first write.

        `clear`: an earlier output is removed now (`overwrite=true`, a tool that does not resume). `lock=False`
        for the ranks of one job, which share the folder by design.
        """
        if self.held is not None:
            return self
        self.created = not self.path.exists()
        self.held = contextlib.ExitStack()
        if lock:
            self.held.callback(lock_folder(self.path, f"{self.tool} run").release)
        self.path.mkdir(parents=True, exist_ok=True)
        self.files = self._recorded()
        try:
            self.check()  # another run may have written here since the first check
        except ConfigError:
            self.release()
            raise
        for leftover in (STAGING, REPLACED):  # a killed run's: the lock says no one else writes here
            shutil.rmtree(self.path / leftover, ignore_errors=True)
        if clear and self.overwrite and not self.resumable:
            self._remove([n for n in self.entries() if n != self.log])
            self.files = set()
        self._save(None if self.resumable and not self.files else self.files)
        return self

    def _save(self, files: set[str] | None) -> None:
        self.files = files
        record = {"tool": self.tool, "files": None if files is None else sorted(files)}
        atomic_write(self.path / RECORD, lambda tmp: tmp.write_text(json.dumps(record) + "\n", encoding="utf-8"))

    def _remove(self, names: list[str]) -> None:
        for name in names:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def claim(self, name: str) -> Path:
        """Record `name` (its first folder) as the tool's before it is written: a kill never leaves it unrecorded."""
        self.open()
        top = Path(name).parts[0]
        if self.files is not None and top not in self.files:
            self._save(self.files | {top})
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        return self.path / name

    def put(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write one file `name` atomically through `write(tmp_path)` (an earlier output is cleared first)."""
        return atomic_write(self.claim(name), write)

    def put_text(self, name: str, text: str) -> Path:
        return self.put(name, lambda tmp: tmp.write_bytes(text.encode("utf-8")))

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A private folder to write a whole output into; on success it replaces the earlier output.

        On an error nothing is moved: the earlier output is left as it was, and a folder this call made is removed.
        """
        self.open(clear=False)
        stage = self.path / STAGING
        try:
            stage.mkdir()
            yield stage
            self._commit(stage)
        except Exception as err:
            if (code := refused_errno(err)) is not None and not getattr(err, "filename", None):
                raise OSError(code, os.strerror(code), str(self.path)) from err  # the folder the user named
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            self.release()

    def _commit(self, stage: Path) -> None:
        """The earlier output moved aside, the new one moved in (one `os.replace` per name), the earlier removed."""
        new, old = sorted(os.listdir(stage)), [n for n in self.entries() if n != self.log]
        replaced = self.path / REPLACED
        replaced.mkdir()
        for name in old:
            os.replace(self.path / name, replaced / name)
        self._save(set(new))
        for name in new:
            os.replace(stage / name, self.path / name)
        shutil.rmtree(replaced)

    def release(self) -> None:
        """Let go of the lock; a folder this tool made and left empty is removed (a failed first output)."""
        if self.held is None:
            return
        self.held.close()
        self.held = None
        if self.created and not self.entries():
            shutil.rmtree(self.path, ignore_errors=True)


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def lock_folder(path: str | Path, what: str) -> filelock.BaseFileLock:
    """An exclusive lock on the folder `path` (made if missing): a second writer is refused, not interleaved.

    Held until released or garbage-collected; the kernel lets go of a killed process's lock. The lock file stays
    (hidden, ignored by every listing).
    """
    Path(path).mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(Path(path) / LOCK, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ConfigError(f"{path} is being written by another {what} right now; wait for it to end") from None
    return lock


def unlock_folder(lock: filelock.BaseFileLock) -> None:
    """Let go of `lock_folder`'s lock; a folder left holding only the lock file goes with it (a failed start)."""
    lock.release()
    folder = Path(lock.lock_file).parent
    if folder.is_dir() and [p.name for p in folder.iterdir()] == [LOCK]:
        shutil.rmtree(folder, ignore_errors=True)
