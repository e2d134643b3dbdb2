"""A full or read-only disk under every command that writes: one line naming the file or folder and the space
left, the files already there whole, no temporary files left, and a rerun with room continues (tmpfs of a few
kilobytes; mounting needs root, as CI has)."""

from __future__ import annotations

import shutil
import tarfile

import pytest

from moss.model import MossTTSD, MossTTSDConfig
from moss.outputs import refused_write
from tests.conftest import REPO
from tests.data_pipelines.conftest import codec_files, pipeline_cfg, write_good_corpus  # noqa: F401 - a fixture
from tests.data_pipelines.test_transcribe import StandIns, config, recordings  # noqa: F401 - a fixture
from tests.test_cli import run


def leftovers(folder):
    return [p for p in folder.rglob("*") if ".moss-tmp" in p.name or ".moss-staging" in p.name]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_tokenizer_module):
    folder = tmp_path_factory.mktemp("model")
    MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).save_pretrained(folder)
    tiny_tokenizer_module.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer_module():
    from moss.text.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_export_to_a_full_disk(model_folder, small_disk):
    from moss.training.export import export_checkpoint

    disk = small_disk(1)  # the tiny model's weights are 1.2 MB
    with pytest.raises(OSError) as failed:
        export_checkpoint(model_folder, disk / "exported")
    line = refused_write(failed.value)
    assert line.startswith(f"cannot write {disk / 'exported'}: no space left on the device"), line
    assert not (disk / "exported").exists()  # no empty folder left behind


def test_preprocessing_on_a_full_disk_keeps_its_finished_shards_and_resumes(tmp_path, codec_files, small_disk):  # noqa: F811
    from data_pipelines.preprocess import preprocess

    jsonl = write_good_corpus(tmp_path / "raw", n=16)
    disk = small_disk("60k")
    cfg = pipeline_cfg(codec_files, [jsonl], disk / "shards", cpu_workers=1, records_per_shard=2)
    with pytest.raises(OSError) as failed:
        preprocess(cfg)
    assert "no space left on the device" in refused_write(failed.value)
    done = sorted((disk / "shards").glob("*.tar"))
    assert done, "some shards were finished before the disk filled"
    for shard in done:  # every shard in place is a whole tar, its samples all there
        with tarfile.open(shard) as tar:
            assert tar.getnames()
    assert not leftovers(disk / "shards")
    roomy = tmp_path / "roomy"  # the disk "grows": the same folder on a disk with room
    shutil.copytree(disk / "shards", roomy)
    summary = preprocess(pipeline_cfg(codec_files, [jsonl], roomy, cpu_workers=1, records_per_shard=2))
    assert summary["samples"] == 16


def test_transcription_on_a_full_disk_is_one_error_not_a_failure_per_recording(tmp_path, recordings, small_disk):  # noqa: F811
    from data_pipelines.transcribe import transcribe

    disk = small_disk("100k")  # one 10 s window is 320 kB
    with pytest.raises(OSError) as failed:
        transcribe(config(tmp_path, output_dir=str(disk / "out")), models=StandIns())
    assert "no space left on the device" in refused_write(failed.value)
    assert not leftovers(disk / "out")


@pytest.mark.slow  # three commands as typed (about 40 s); CI runs it
def test_commands_on_a_full_or_read_only_disk_end_in_one_line(tmp_path, model_folder, small_disk):
    full, read_only = small_disk("16k"), small_disk(1, read_only=True)
    text = "text='[S1]Hello, welcome back to the show, it is good to be here.[S2]Thanks, fine!'"
    cases = [
        (["infer.py", f"checkpoint={model_folder}", "codec=tiny", f"output_dir={full}/out", text, "max_seconds=20"], 1),
        (["export.py", f"checkpoint={model_folder}", f"output_dir={full}/exported"], 1),
        (["train.py", f"paths.root={read_only}", "trainer.max_steps=2"], 2),
        (["infer.py", f"checkpoint={model_folder}", "codec=tiny", f"output_dir={read_only}/out", text], 2),
    ]
    for args, status in cases:
        done = run([str(REPO / args[0]), *args[1:]], tmp_path)
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        assert done.returncode == status and last.startswith("error: "), (args, done.stderr[-1500:])
        assert "Traceback" not in done.stderr, done.stderr[-1500:]
        assert ("no space left" in last) if status == 1 else ("not writable" in last), last
