"""Output folders are the user's: a tool writes only its own files there, atomically, and remembers them.

Every tool that writes into a folder a user names (export, infer, preprocessing, the corpus builders, train's
export step) goes through `OutputFolder`. It keeps a record of the files the tool wrote (`.moss-outputs.json`)
and, before anything is written:

* refuses a folder that holds files the tool did not write, unless `overwrite=true`; even then those files are
  kept, and an output whose name one of them already has is refused rather than replaced;
* refuses a folder holding an earlier output of a tool that does not resume, unless `overwrite=true`, which
  replaces that earlier output (files of it not written again are removed: none is left to be mistaken for new);
* refuses a folder that is a file, or cannot be written.

Files reach their final name by `os.replace` from a temporary name in the same folder, so a kill leaves either
the old file or the new one. The record lists a file before it appears under its name, so a killed run never
leaves a file of its own that a rerun would take for the user's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from moss.errors import ConfigError

RECORD = ".moss-outputs.json"
STAGING = ".moss-staging-"  # prefix of the folder a whole output is written into before it is put in place


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
    """The folder `path` as `tool`'s output folder (see the module docstring).

    Args:
        path: the folder (created when missing).
        tool: the writing tool's name, kept in the record (another tool's record counts as foreign files).
        overwrite: the user's `overwrite=true`.
        resumable: the tool continues its own earlier output (preprocessing): its files are no reason to refuse.
        patterns: file names (fnmatch) that are this tool's by construction, also in folders written before the
            record existed, e.g. `shard-*.tar` for preprocessing or `infer.log`.
        setting: the setting that named the folder, for messages.
    """

    def __init__(
        self,
        path: str | Path,
        tool: str,
        overwrite: bool = False,
        resumable: bool = False,
        patterns: Iterable[str] = (),
        setting: str = "output_dir",
    ):
        self.path, self.tool, self.overwrite, self.resumable = Path(path), tool, bool(overwrite), resumable
        self.patterns, self.setting = tuple(patterns), setting
        self.written: set[str] = set()  # files this run put in place
        self._earlier = self._read_record()

    # -- what is there ---------------------------------------------------------------------------------------
    def _read_record(self) -> set[str]:
        try:
            record = json.loads((self.path / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        if not isinstance(record, dict) or record.get("tool") != self.tool or not isinstance(record.get("files"), list):
            return set()
        return {f for f in record["files"] if isinstance(f, str) and _relative(f)}

    def own(self, name: str) -> bool:
        """Whether `name` (relative to the folder) was written by this tool.

        Recorded, named as only this tool names files, or a folder holding only such files.
        """
        path = self.path / name
        if path.is_dir() and not path.is_symlink():
            return all(self.own(str(f.relative_to(self.path))) for f in path.rglob("*") if not f.is_dir())
        return name in self._earlier or name in self.written or any(fnmatch.fnmatch(name, p) for p in self.patterns)

    def entries(self) -> list[str]:
        """Names in the folder, less the record, staging folders and temporaries (the next write replaces them)."""
        if not self.path.is_dir():
            return []
        names = (n for n in os.listdir(self.path) if n != RECORD and not n.startswith(STAGING))
        return sorted(n for n in names if not fnmatch.fnmatch(n, TEMPORARY))

    # -- the checks, before anything is written --------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every reason to refuse the folder, each with its fix (empty: it may be written)."""
        if problem := writable_folder_problem(self.path, self.setting):
            return [problem]
        owned = {n: self.own(n) for n in self.entries()}
        foreign, own = [n for n, mine in owned.items() if not mine], [n for n, mine in owned.items() if mine]
        if foreign and not self.overwrite:
            return [
                f"{self.setting}={self.path} holds {len(foreign)} file(s) that {self.tool} did not write "
                f"({_listing(foreign)}); choose a new folder, or add overwrite=true to write beside them "
                f"(they are kept, never replaced)"
            ]
        if own and not self.overwrite and not self.resumable:
            return [
                f"{self.setting}={self.path} holds an earlier {self.tool} output ({_listing(own)}); add "
                f"overwrite=true to replace it, or choose a new folder"
            ]
        return []

    def check(self) -> OutputFolder:
        """Raise one ConfigError when the folder may not be written (it is created by the first write)."""
        if problems := self.problems():
            raise ConfigError("\n".join(problems))
        for leftover in self.path.glob(STAGING + "*") if self.path.is_dir() else ():  # a killed run's unfinished output
            if leftover.is_dir() and not _alive(leftover.name[len(STAGING) :]):
                shutil.rmtree(leftover, ignore_errors=True)
        return self

    # -- writing ---------------------------------------------------------------------------------------------
    def _claim(self, names: Iterable[str]) -> None:
        """Refuse names that are someone else's; record the rest before they appear under their names."""
        names = [n for n in names if n not in self.written]
        self.refuse_taken(names)
        self._save_record(self._earlier | self.written | set(names))
        self.written.update(names)

    def _save_record(self, files: set[str]) -> None:
        text = json.dumps({"tool": self.tool, "files": sorted(f for f in files if f != RECORD)}, indent=0) + "\n"
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / RECORD, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def put(self, name: str, write: Callable[[Path], None]) -> Path:
        """Write one file `name` atomically through `write(tmp_path)`."""
        self._claim([name])
        return atomic_write(self.path / name, write)

    def put_text(self, name: str, text: str) -> Path:
        return self.put(name, lambda tmp: tmp.write_bytes(text.encode("utf-8")))

    def refuse_taken(self, names: Iterable[str]) -> None:
        """Raise before any work when one of the names the tool will write is a file of someone else's."""
        taken = [n for n in names if (self.path / n).exists() and not self.own(n)]
        if taken:
            raise ConfigError(
                f"{self.setting}={self.path}: {self.tool} would replace {_listing(taken)}, which it did not write; "
                f"move them away or choose a new folder (overwrite=true never replaces files of others)"
            )

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A private folder to write a whole output into; on success its files are moved into place.

        Files of an earlier output of this tool that the new one does not have are removed afterwards; on an
        error nothing is moved and the earlier output is left as it was.
        """
        stage = self.path / f"{STAGING}{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        created = not self.path.exists()
        stage.mkdir(parents=True)
        try:
            yield stage
            self.commit(stage)
        except Exception as err:
            if (code := refused_errno(err)) is not None and not getattr(err, "filename", None):
                raise OSError(code, os.strerror(code), str(self.path)) from err  # the folder the user named
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            if created and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()  # a failed first output leaves no empty folder behind

    def commit(self, stage: Path) -> None:
        """Move the files of `stage` into the folder (one `os.replace` each) and drop stale earlier outputs."""
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if not p.is_dir())
        self._claim(names)
        for name in names:
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, self.path / name)
        self.finish()

    def finish(self) -> None:
        """Remove the files of the earlier output that this run did not write again, and record what is left."""
        root = self.path.resolve()
        for name in sorted(self._earlier - self.written):
            if not (self.path / name).parent.resolve().is_relative_to(root):
                continue  # reached through a link to elsewhere: not this folder's file
            with contextlib.suppress(OSError):
                (self.path / name).unlink()
            parent = (self.path / name).parent
            while parent != self.path and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()  # a sub-folder the earlier output made and this one does not use
                parent = parent.parent
        self._earlier = set()
        self._save_record(self.written)


def _relative(name: str) -> bool:
    """A recorded name that stays inside the folder (a record is data another process may have written)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\0" not in name


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _alive(pid: str) -> bool:
    """Whether the process `pid` (a staging folder's owner) still runs."""
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # our own leftover from an earlier attempt in this process
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock on a folder for the life of a process: a second writer is refused, not interleaved.

    `flock` on the folder itself: no lock file is left behind, and the kernel lets go of a killed process's
    lock. Held by the one process that owns the folder (not inherited by the processes it starts).
    """

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise ConfigError(f"{self.path} is being written by another {what} right now; wait for it to end") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
