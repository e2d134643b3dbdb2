"""infer.py keeps a user's files and its own promises: output folders, per-item bounds, stops and kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from infer import infer
from moss.errors import ConfigError
from moss.inference import Synthesizer
from tests.conftest import REPO

SCRIPTS = ['{"text": "[S1]hello there[S2]hi"}', '{"text": "[S1]a b c"}', '{"text": "[S2]one two"}']


def run(cfg, tmp_path, lines=SCRIPTS, **overrides):
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    return infer(OmegaConf.merge(cfg, {"input": str(tmp_path / "in.jsonl"), **overrides}))


def listed(out) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_a_folder_of_someone_elses_files_is_refused_and_kept(tmp_path, tiny_inference):
    out = tmp_path / "out"
    out.mkdir()
    mine = {"output_0000.wav": b"my recording", "results.jsonl": b"my notes\n", "notes.txt": b"keep"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    with pytest.raises(ConfigError, match="did not write .*overwrite=true") as err:
        run(tiny_inference, tmp_path)
    assert str(err.value).count("\n  - ") == 1  # one problem, named with its fix
    # overwrite=true replaces only an earlier output of infer's own: the folder is still refused
    with pytest.raises(ConfigError, match="3 file\\(s\\) that infer did not write .*never replaces files of others"):
        run(tiny_inference, tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == mine  # nothing written, not even a record
    # once the folder is empty again, it is infer's
    for name in mine:
        (out / name).unlink()
    results = run(tiny_inference, tmp_path)
    assert len(listed(out)) == len(results) == 3


def test_a_rerun_replaces_only_its_own_earlier_run_and_lists_only_its_files(tmp_path, tiny_inference, monkeypatch):
    out = tmp_path / "out"

    def speaks(self, items, write):  # a tenth of a second of audio per item
        return [write(item, torch.full((3200,), 0.1)) for item in items]

    monkeypatch.setattr(Synthesizer, "synthesize", speaks)
    first = run(tiny_inference, tmp_path)
    assert all(os.path.isfile(r.path) for r in first) and len(first) == 3
    with pytest.raises(ConfigError, match="holds an earlier infer output .* add overwrite=true"):
        run(tiny_inference, tmp_path)

    def silent(self, items, write):  # the model ends every script at once: no audio for any item
        return [write(item, torch.zeros(0)) for item in items]

    monkeypatch.setattr(Synthesizer, "synthesize", silent)
    second = run(tiny_inference, tmp_path, lines=SCRIPTS[:2], overwrite=True)
    assert all(r.error.startswith("generated no audio") for r in second)
    assert [x.get("path") for x in listed(out)] == [None, None]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["results.jsonl"]


def test_a_stopped_run_lists_each_item_once_and_only_files_that_exist(tmp_path, tiny_inference, monkeypatch):
    real = Synthesizer.synthesize
    calls = []

    def stops_on_the_second_batch(self, items, write):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped by SIGTERM")
        return real(self, items, write)

    monkeypatch.setattr(Synthesizer, "synthesize", stops_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_inference, tmp_path, batch_size=1)
    lines = listed(tmp_path / "out")
    assert [x["index"] for x in lines] == [0, 1, 2]
    assert [x.get("error", "") for x in lines[1:]] == ["not synthesised: the run stopped"] * 2
    assert all(os.path.isfile(x["path"]) for x in lines if "path" in x)


def write_wav(path, seconds, claimed_seconds=None):
    sf.write(path, (np.random.default_rng(0).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32), 16000)
    if claimed_seconds is not None:  # a header claiming more data than the file holds
        data = bytearray(path.read_bytes())
        data[40:44] = int(claimed_seconds * 16000 * 2).to_bytes(4, "little")
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", range(24))
def test_items_over_the_bounds_are_refused_before_synthesis(tmp_path, tiny_inference, monkeypatch, case):
    """Generated items: huge scripts, long or lying prompt clips, rows beyond the model; the others go on."""
    rng = random.Random(case)
    write_wav(tmp_path / "ok.wav", 1.0)
    write_wav(tmp_path / "long.wav", 3.5)
    write_wav(tmp_path / "liar.wav", 0.5, claimed_seconds=2400)
    words = " ".join(rng.choice(["ha", "hello", "你好", "ok"]) for _ in range(rng.randrange(1, 40)))
    huge = "[S1]" + "word " * rng.randrange(60_000, 200_000)
    items = [
        ({"text": f"[S1]{words}"}, None),
        ({"text": huge}, "exceeds the model's"),
        ({"text": "[S1]hi", "prompt_audio": "long.wav", "prompt_text": "[S1]x"}, "longer than the maximum"),
        ({"text": "[S1]hi", "prompt_audio": "liar.wav", "prompt_text": "[S1]x"}, "cut short"),
        ({"text": "[S1]hi", "prompt_audio": "ok.wav", "prompt_text": "[S1]x"}, None),
    ]
    rng.shuffle(items)
    seen = []
    real = Synthesizer.synthesize

    def recording(self, group, write):
        seen.extend(item.index for item in group)
        return real(self, group, write)

    monkeypatch.setattr(Synthesizer, "synthesize", recording)
    results = run(
        tiny_inference,
        tmp_path,
        lines=[json.dumps(item) for item, _ in items],
        max_prompt_seconds=3,
        max_rows=rng.choice([None, 20_000]),
    )
    for (_, reason), res in zip(items, results, strict=True):
        if reason is None:
            assert res.index in seen and (res.error is None or res.error.startswith("generated no audio"))
        else:
            assert res.index not in seen and reason in res.error, res.error


@pytest.mark.slow  # two inference processes (about 40 s)
def test_sigterm_completes_the_list_and_kill_9_loses_at_most_the_item_in_flight(tmp_path, tiny_inference):
    scripts = [json.dumps({"text": f"[S1]item {i} " + "word " * 10}) for i in range(40)]
    (tmp_path / "in.jsonl").write_text("\n".join(scripts) + "\n")
    cfg = tiny_inference
    overrides = [
        f"checkpoint={cfg.checkpoint}",
        f"codec.config={cfg.codec.config}",
        f"codec.checkpoint={cfg.codec.checkpoint}",
        f"input={tmp_path / 'in.jsonl'}",
        f"output_dir={tmp_path / 'out'}",
        "max_seconds=0.8",
        "batch_size=1",
        "progress=false",
        "sampling={do_sample: false}",
        "overwrite=true",
    ]
    for how in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "infer.py"), *overrides],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        results = tmp_path / "out" / "results.jsonl"
        started = time.monotonic()
        while not (results.is_file() and results.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() - started < 120
            time.sleep(0.05)
        os.killpg(proc.pid, how)
        proc.communicate(timeout=60)
        lines = listed(tmp_path / "out")
        assert lines and all(os.path.isfile(x["path"]) and sf.info(x["path"]).frames > 0 for x in lines if "path" in x)
        assert len({x["index"] for x in lines}) == len(lines)
        if how == signal.SIGTERM:
            assert [x["index"] for x in lines] == list(range(40)), "a complete list after SIGTERM"
            assert lines[-1]["error"] == "not synthesised: the run stopped"
