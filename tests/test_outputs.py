"""Output folders are the user's: generated folder states, each with the outcome the rules promise.

For every generated mix of a user's files, an earlier output of the tool and `overwrite`, a tool either refuses
with one message (and changes nothing) or writes its output while every file it did not write stays
byte-identical; an earlier output of its own is replaced, with no stale file left behind.
"""

import os
import random
import subprocess
import sys

import pytest

from moss.errors import ConfigError
from moss.outputs import RECORD, FolderLock, OutputFolder, atomic_write

CASES = 120
USER_NAMES = [
    "model-00001-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "generation_config.json",
    "notes.txt",
    "output_0000.wav",
    "results.jsonl",
    "config.json",
    "sub/keep.me",
]
TOOL_NAMES = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "audio/a.wav"]


def snapshot(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".moss")
    }


def write_output(folder: OutputFolder, names: list[str], tag: str) -> None:
    with folder.staged() as stage:
        for name in names:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_text(f"{tag}:{name}")


@pytest.mark.parametrize("case", range(CASES))
def test_generated_folder_states(tmp_path, case):
    rng = random.Random(case)
    out = tmp_path / "out"
    user = sorted(rng.sample(USER_NAMES, rng.randrange(0, 4)))
    earlier = sorted(rng.sample(TOOL_NAMES, rng.randrange(0, 3))) if rng.random() < 0.5 else []
    if earlier:
        write_output(OutputFolder(out, "export").check(), earlier, "old")
    for name in user:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        if not (out / name).exists():
            (out / name).write_text(f"user:{name}")
    user = [n for n in user if (out / n).read_text().startswith("user:")]
    overwrite = rng.random() < 0.6
    new = sorted(rng.sample(TOOL_NAMES, rng.randrange(1, len(TOOL_NAMES) + 1)))
    before = snapshot(out) if out.exists() else {}
    folder = OutputFolder(out, "export", overwrite=overwrite)
    refused = (user and not overwrite) or (earlier and not overwrite)
    collision = [n for n in new if n in user]
    try:
        folder.check()
        write_output(folder, new, "new")
    except ConfigError as err:
        assert refused or collision, err
        assert "\n" not in str(err) and ("overwrite=true" in str(err))
        assert (snapshot(out) if out.exists() else {}) == before  # nothing changed
        return
    assert not refused and not collision
    after = snapshot(out)
    for name in user:
        assert after[name] == before[name]  # the user's files, byte for byte
    for name in new:
        assert after[name] == f"new:{name}".encode()
    stale = set(earlier) - set(new)
    assert not stale & set(after), "an earlier output's file that the new one lacks is removed"
    assert set(after) == set(user) | set(new)


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "results.jsonl"
    target.write_text("old\n")

    def dies(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["results.jsonl"]


def test_a_failed_output_leaves_the_earlier_one_whole(tmp_path):
    folder = OutputFolder(tmp_path, "export").check()
    write_output(folder, ["config.json", "model.safetensors"], "old")
    again = OutputFolder(tmp_path, "export", overwrite=True).check()
    with pytest.raises(RuntimeError), again.staged() as stage:
        (stage / "config.json").write_text("new")
        raise RuntimeError("the export failed half-way")
    assert snapshot(tmp_path) == {"config.json": b"old:config.json", "model.safetensors": b"old:model.safetensors"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".moss-staging")] == []


def test_a_killed_runs_staging_folder_is_cleared(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".moss-staging-{dead.stdout.strip()}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("half")
    OutputFolder(tmp_path, "export").check()
    assert not leftover.exists()


@pytest.mark.parametrize("setting", ["file", "read-only", "under-a-file"])
def test_unusable_folders_are_one_message(tmp_path, monkeypatch, setting):
    if setting == "file":
        target = tmp_path / "out"
        target.write_text("x")
    elif setting == "under-a-file":
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "out"
    else:  # root may write anywhere, so the permission check is answered as for a user without the right
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "out"
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    with pytest.raises(ConfigError, match="output_dir=.*(is a file|not writable)"):
        OutputFolder(target, "export").check()


def test_a_record_naming_paths_outside_the_folder_is_ignored(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD).write_text('{"tool": "export", "files": ["../precious.txt", "/etc/passwd", "a/../../x"]}')
    folder = OutputFolder(out, "export", overwrite=True).check()
    write_output(folder, ["config.json"], "new")
    assert outside.read_text() == "keep"


def test_another_tools_output_counts_as_foreign(tmp_path):
    write_output(OutputFolder(tmp_path, "infer").check(), ["results.jsonl"], "old")
    with pytest.raises(ConfigError, match="1 file\\(s\\) that export did not write"):
        OutputFolder(tmp_path, "export").check()


def test_a_locked_folder_refuses_a_second_writer_until_released(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from moss.outputs import FolderLock; FolderLock(sys.argv[1], 'x'); print('ok', "
            "flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(ConfigError, match="being written by another preprocessing run"):
            FolderLock(tmp_path, "preprocessing run")
    finally:
        holder.kill()
        holder.wait()
    FolderLock(tmp_path, "preprocessing run").release()  # the kernel let go of the killed holder's lock


def test_stale_names_reached_through_a_link_are_not_deleted(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model.safetensors").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside)  # the user's link inside the folder
    (out / RECORD).write_text('{"tool": "export", "files": ["link/model.safetensors"]}')
    folder = OutputFolder(out, "export", overwrite=True).check()
    write_output(folder, ["config.json"], "new")
    assert (outside / "model.safetensors").read_text() == "keep" and (out / "link").is_symlink()


def test_a_killed_writes_temporary_file_is_the_tools_own_and_the_next_write_replaces_it(tmp_path):
    (tmp_path / ".results.moss-tmp.jsonl").write_text("half")  # what kill -9 during atomic_write leaves
    folder = OutputFolder(tmp_path, "infer")
    assert folder.problems() == []  # not taken for a file of the user's
    folder.put_text("results.jsonl", "new\n")
    assert sorted(os.listdir(tmp_path)) == [RECORD, "results.jsonl"]
    (tmp_path / ".notes.txt").write_text("the user's")  # a hidden file that is not a temporary is still foreign
    (tmp_path / ".results.tmp.jsonl").write_text("the user's")  # nor one that only looks like a temporary
    assert "did not write" in OutputFolder(tmp_path, "infer").problems()[0]
