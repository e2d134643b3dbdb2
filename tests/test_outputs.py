"""Output folders by one rule: generated folder states, each with the outcome the rule promises.

For every generated mix of a user's files, an earlier output of the tool and `overwrite`, a tool either refuses
with one message (and changes nothing) or writes its output into a folder that held only its own; an earlier
output is replaced whole, with no stale file left behind.
"""

import os
import random
import subprocess
import sys

import pytest

from moss.errors import ConfigError
from moss.outputs import LOCK, RECORD, STAGING, OutputFolder, atomic_write, lock_folder

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
    refused = user or (earlier and not overwrite)  # the user's files refuse a folder, overwrite or not
    try:
        folder.check()
        write_output(folder, new, "new")
    except ConfigError as err:
        assert refused, err
        assert "\n" not in str(err) and ("overwrite=true" in str(err))
        assert (snapshot(out) if out.exists() else {}) == before  # nothing changed
        return
    assert not refused
    after = snapshot(out)
    for name in new:
        assert after[name] == f"new:{name}".encode()
    assert set(after) == set(new), "an earlier output's file that the new one lacks is removed"


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
    assert not (tmp_path / STAGING).exists()


def test_a_killed_runs_staging_folder_is_cleared_and_a_first_output_that_failed_leaves_no_folder(tmp_path):
    write_output(OutputFolder(tmp_path / "out", "export").check(), ["config.json"], "old")
    (tmp_path / "out" / STAGING).mkdir()
    (tmp_path / "out" / STAGING / "model.safetensors").write_text("half")  # what kill -9 mid-export leaves
    write_output(OutputFolder(tmp_path / "out", "export", overwrite=True).check(), ["model.safetensors"], "new")
    assert snapshot(tmp_path / "out") == {"model.safetensors": b"new:model.safetensors"}
    assert not (tmp_path / "out" / STAGING).exists()
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "new", "export").check().staged():
        raise RuntimeError("the first export failed")
    assert not (tmp_path / "new").exists()


def test_the_tools_own_log_is_neither_foreign_nor_replaced(tmp_path):
    (tmp_path / "export.log").write_text("the running command's log\n")  # Hydra made it before the check
    write_output(OutputFolder(tmp_path, "export").check(), ["config.json"], "old")
    write_output(OutputFolder(tmp_path, "export", overwrite=True).check(), ["config.json"], "new")
    assert snapshot(tmp_path) == {"export.log": b"the running command's log\n", "config.json": b"new:config.json"}


def test_a_second_writer_of_the_same_folder_is_refused_while_the_first_writes(tmp_path):
    first = OutputFolder(tmp_path, "infer").open()
    with pytest.raises(ConfigError, match="being written by another infer run"):
        OutputFolder(tmp_path, "infer", overwrite=True).open()
    first.release()
    OutputFolder(tmp_path, "infer", overwrite=True).open().release()
    # checked before, written by another run since: refused at the first write, and the lock let go
    late = OutputFolder(tmp_path / "new", "infer").check()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="did not write \\(mine.txt\\)"):
        late.put_text("results.jsonl", "")
    lock_folder(tmp_path / "new", "check").release()  # not held any more


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
            "import sys, time; from moss.outputs import lock_folder; held = lock_folder(sys.argv[1], 'x'); print('ok', "
            "flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(ConfigError, match="being written by another preprocessing run"):
            lock_folder(tmp_path, "preprocessing run")
    finally:
        holder.kill()
        holder.wait()
    lock_folder(tmp_path, "preprocessing run").release()  # the kernel let go of the killed holder's lock


@pytest.mark.parametrize("tool", ["export", "infer"])
def test_replacing_an_output_removes_its_links_never_what_they_point_to(tmp_path, tool):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model.safetensors").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(outside)
    (out / RECORD).write_text(f'{{"tool": "{tool}", "files": ["link"]}}')
    folder = OutputFolder(out, tool, overwrite=True).check()
    if tool == "export":
        write_output(folder, ["config.json"], "new")
    else:  # a progressive writer clears the earlier output at its first write
        folder.put_text("results.jsonl", "new\n")
    assert (outside / "model.safetensors").read_text() == "keep" and not (out / "link").exists()


def test_a_killed_writes_temporary_file_is_the_tools_own_and_the_next_write_replaces_it(tmp_path):
    (tmp_path / ".results.moss-tmp.jsonl").write_text("half")  # what kill -9 during atomic_write leaves
    folder = OutputFolder(tmp_path, "infer")
    assert folder.problems() == []  # not taken for a file of the user's
    folder.put_text("results.jsonl", "new\n")
    assert sorted(os.listdir(tmp_path)) == sorted([LOCK, RECORD, "results.jsonl"])
    (tmp_path / ".notes.txt").write_text("the user's")  # a hidden file that is not a temporary is still foreign
    (tmp_path / ".results.tmp.jsonl").write_text("the user's")  # nor one that only looks like a temporary
    assert "did not write" in OutputFolder(tmp_path, "infer").problems()[0]
