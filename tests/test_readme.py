"""Every command documented in README.md and data_pipelines/README.md, run as written, in the order a user would.

Placeholders (`/path/to/MOSS-TTSD-v0.5`, `/data/...`, the codec files) become tiny stand-ins; a few size
settings are appended where a command would otherwise run for minutes (they are listed below, and never
change what the command does). A documented command that this test neither runs nor skips with a reason
fails it, so README and test cannot drift apart. The user's folders are snapshotted: no command writes
into them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import save_file

from moss.codec import XYTokenizer, XYTokenizerConfig
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from tests.conftest import REPO
from tests.data_pipelines.conftest import write_good_corpus
from tests.data_pipelines.voices import voiced
from tests.evaluation.conftest import build_tiny_speaker_model, build_tiny_whisper

pytestmark = pytest.mark.slow

DOCUMENTS = (REPO / "README.md", REPO / "data_pipelines" / "README.md")
# Documented commands this test does not run, and why.
NOT_RUN = {
    "pip install": "the installation itself: .ci/run does it on a clean clone",
    "python -m pytest": "this test suite",
    "torchrun": "several machines",
    "srun": "a SLURM cluster",
    "python benchmarks/": "benchmarks print measurements (minutes); they are not a workflow step",
    "bash benchmarks/": "the GPU machine's check",
    "bash .ci/floor": "the floor-version CI",
    "python app.py": "a server that runs until stopped: tests/studio/test_browser.py drives it in chromium",
    "export AWS_ENDPOINT_URL": "where the store is: this test points it at its own S3 server (tests/s3.py)",
}
GPU_EXPERIMENT = "experiment=lora_v05"
CPU_INSTEAD = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1", "strategy=auto"]


def documented_commands() -> list[str]:
    """Commands of the `bash` blocks (continuations joined, `&&` split) and inline `python ...` spans."""
    commands: list[str] = []
    for document in DOCUMENTS:
        text = document.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+", " ", line).strip()
                if line and not line.startswith("#"):
                    commands += [part.strip() for part in line.split("&&")]
        commands += [re.sub(r"\s+", " ", c) for c in re.findall(r"`((?:python|bash|torchrun|srun) [^`]*)`", text)]
    return list(dict.fromkeys(commands))


def stand_ins(tmp_path: Path) -> dict[str, str]:
    """Placeholder -> tiny stand-in, longest first so that a path is replaced before its parts."""
    user = tmp_path / "user"  # the user's folders: read, never written
    from moss.model import MossTTSD, MossTTSDConfig
    from moss.text.tiny_tokenizer import build_tiny_tokenizer

    model = user / "MOSS-TTSD-v0.5"
    MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).save_pretrained(model)
    build_tiny_tokenizer().save_pretrained(model)
    write_shards(generate_samples(96, seed=1), user / "shards", prefix="train", max_samples=8)
    write_shards(generate_samples(16, seed=2), user / "val", prefix="val", max_samples=8)
    write_shards(generate_samples(96, seed=5), user / "general", prefix="general", max_samples=8)
    codec = user / "ckpt"
    codec.mkdir()
    config = XYTokenizerConfig.tiny()
    (codec / "xy_tokenizer_32k_config.yaml").write_text(yaml.safe_dump({"generator_params": config.params}))
    weights = XYTokenizer.from_config(config, seed=4).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(codec / "xy_tokenizer.safetensors"))
    raw = write_good_corpus(user / "raw", n=6)
    dialogues = user / "dialogues.jsonl"
    dialogues.write_text(
        json.dumps({"text": "[S1]Hi there.[S2]Hello!"}) + "\n" + json.dumps({"text": "[S1]Bye."}) + "\n"
    )
    legacy = user / "processed_data.pkl"
    records = [{"input_ids": [[1 + c for c in range(8)]] * 3, "labels": [[2 + c for c in range(8)]] * 3}] * 2
    blobs = [pickle.dumps(r, protocol=4) for r in records]
    legacy.write_bytes(b"".join(blobs))
    np.save(user / "processed_data_metas.npy", np.array([[0, len(blobs[0])], [3, 3], [4, 4]]))
    recordings = user / "recordings"  # untranscribed dialogue: two synthetic voices taking turns
    recordings.mkdir()
    a, b = voiced(3, 110, [(700, 80), (1220, 90)]), voiced(3, 220, [(300, 60), (2300, 100)], seed=1)
    pause = np.zeros(8000, np.float32)
    sf.write(recordings / "talk.wav", np.concatenate([a, pause, b, pause, a]), 16000)
    build_tiny_whisper(user / "whisper")  # the metric models of the evaluation commands
    build_tiny_speaker_model(user / "speaker")
    for n in (1, 2):
        sf.write(
            user / f"voice{n}.wav", 0.1 * np.random.default_rng(n).standard_normal(16000).astype(np.float32), 16000
        )
    heldout = {"text": "[S1]Good morning.[S2]Morning to you!", "expected_seconds": 1.5}
    heldout.update(prompt_audio_speaker1="voice1.wav", prompt_audio_speaker2="voice2.wav")
    (user / "heldout.jsonl").write_text(json.dumps(heldout) + "\n")
    return {
        "openai/whisper-large-v3": str(user / "whisper"),
        "microsoft/wavlm-base-plus-sv": str(user / "speaker"),
        "=heldout.jsonl": f"={user / 'heldout.jsonl'}",
        "/path/to/MOSS-TTSD-v0.5": str(model),
        "model.path=...": f"model.path={model}",
        "'/data/shards/*.tar'": f"'{user / 'shards'}/*.tar'",
        "data.train_shards=...": f"data.train_shards={user / 'shards'}",
        "'/data/val/*.tar'": f"'{user / 'val'}/*.tar'",
        "/ckpt/xy_tokenizer_32k_config.yaml": str(codec / "xy_tokenizer_32k_config.yaml"),
        "/ckpt/xy_tokenizer.ckpt": str(codec / "xy_tokenizer.safetensors"),
        "codec.config=xy_tokenizer_32k_config.yaml": f"codec.config={codec / 'xy_tokenizer_32k_config.yaml'}",
        "codec.checkpoint=xy_tokenizer.ckpt": f"codec.checkpoint={codec / 'xy_tokenizer.safetensors'}",
        "input=dialogues.jsonl": f"input={dialogues}",
        "/data/train.jsonl": str(raw),
        "/data/recordings": str(recordings),
        "/data/transcribed": str(tmp_path / "data" / "transcribed"),
        "/data/voices": str(user / "shards"),
        "/data/general": str(user / "general"),
        "/data/processed_data.pkl": str(legacy),
        "/data/shards": str(tmp_path / "data" / "shards"),  # what the pipelines write: the user's output folder
    }


def argv(command: str, replacements: dict[str, str]) -> list[str]:
    for placeholder, value in replacements.items():
        command = command.replace(placeholder, value)
    args = shlex.split(command)
    assert args[0] == "python", command
    if args[1].endswith(".py"):
        args[1] = str(REPO / args[1])  # run from another directory, as an installed user would
    return [sys.executable, *args[1:]]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return done


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_every_documented_command_runs_as_written(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # preprocessing's work folder for a bucket
    replacements = stand_ins(tmp_path)
    user = snapshot(tmp_path / "user")
    work = tmp_path / "work"  # the user's working directory
    work.mkdir()
    commands = documented_commands()
    ran = []

    def ok(command: str, *extra: str) -> subprocess.CompletedProcess:
        done = run([*argv(command, replacements), *extra], work)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        ran.append(command)
        return done

    # Quick start: the built-in tiny default, exactly as written; README states the loss it reaches.
    quick = next(c for c in commands if c == "python train.py")
    done = ok(quick)
    final = dict(re.findall(r"(train/loss|val/loss) ([\d.]+)", done.stdout.splitlines()[-1]))
    assert float(final["train/loss"]) < 1.6 and float(final["val/loss"]) < 1.6, done.stdout[-500:]
    assert (work / "runs" / "tiny" / "export" / "model.safetensors").is_file()
    noise = [line for line in done.stderr.splitlines() if re.search(r"[Ww]arning|deprecated|litlogger", line)]
    assert not noise, noise
    # Resuming the finished run: nothing to train, the same export, no noise.
    done = ok(next(c for c in commands if c == "python train.py resume=auto"))
    assert "none logged now: the run was already at step 300" in done.stdout, done.stdout[-500:]
    assert (work / "runs" / "tiny" / "export" / "model.safetensors").is_file()
    assert not [line for line in done.stderr.splitlines() if re.search(r"[Ww]arning", line)], done.stderr

    # The real recipe on a machine without a GPU: refused with the fix; then the fix, at 2 steps.
    for command in [c for c in commands if c.startswith("python train.py " + GPU_EXPERIMENT)]:
        if not torch.cuda.is_available():
            done = run(argv(command, replacements), work)
            assert done.returncode == 2 and "trainer.accelerator=cpu trainer.precision=32-true" in done.stderr
            assert "Traceback" not in done.stderr
            ran.append(command)
    recipe = next(c for c in commands if c.startswith("python train.py " + GPU_EXPERIMENT))
    ok(recipe, *CPU_INSTEAD, "trainer.max_steps=2")
    adapter = json.loads((work / "runs" / "lora_v05" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == replacements["/path/to/MOSS-TTSD-v0.5"]  # absolute

    # The quality gate on the same recipe (its own run name), then base vs tuned with evaluate.py.
    gate = next(c for c in commands if c.startswith("python train.py " + GPU_EXPERIMENT) and "quality_gate" in c)
    gated = ["name=lora-gate", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    ok(gate, *CPU_INSTEAD, *gated, "callbacks.quality_gate.max_seconds=2", "callbacks.quality_gate.asr_language=en")
    report = json.loads((work / "runs" / "lora-gate" / "export" / "eval_report.json").read_text())
    assert set(report["checkpoints"]) == {"base", "tuned"} and "cer" in report["comparison"]
    done = ok(next(c for c in commands if c.startswith("python evaluate.py")), "max_seconds=2", "progress=false")
    assert "wrote" in done.stdout and (work / "eval" / "eval_report.html").is_file(), done.stdout

    # Weighted sources on the same recipe: planned by the target's epochs, each source reported.
    mixed = next(c for c in commands if "data.sources=" in c)
    done = ok(mixed, *CPU_INSTEAD, "name=lora-sources")
    assert re.search(r"sources: +target \d+ samples \([\d.]+ epochs\), general \d+ samples", done.stdout), done.stdout
    card = json.loads((work / "runs" / "lora-sources" / "data_card.json").read_text())
    assert {"train/target", "train/general"} <= set(card["splits"])

    # Hyper-parameter sweep (2 jobs x 2 DDP ranks), shortened.
    sweep = next(c for c in commands if " -m " in c and c.startswith("python train.py"))
    done = ok(sweep, "trainer.max_steps=4", "export.enabled=false")
    assert "sync_dist" not in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in (work / "runs" / "tiny-multirun").iterdir() if p.is_dir()) == ["0", "1"]

    # Export of a checkpoint, then inference on it and on the LoRA run's export.
    ok(next(c for c in commands if c.startswith("python export.py")))
    for command in [c for c in commands if c.startswith("python infer.py")]:
        done = ok(command, "max_seconds=2", "progress=false")
        # The 2-step LoRA of a random model may end its scripts at once (reported per item); the trained tiny
        # default speaks.
        expected = r"wrote 1 of 1 items" if "runs/tiny/export" in command else r"wrote \d of 2 items"
        assert re.search(expected, done.stdout), done.stdout
    assert (work / "out" / "results.jsonl").is_file() and (work / "try" / "output_0000.wav").is_file()

    # Data preparation: raw JSONL + audio -> shards, their statistics, the legacy import.
    ok(next(c for c in commands if c.startswith("python -m data_pipelines.preprocess")), "progress=false")
    done = ok(next(c for c in commands if c.startswith("python -m data_pipelines.inspect_shards")))
    assert "samples: 6" in done.stdout, done.stdout
    legacy = next(c for c in commands if c.startswith("python -m data_pipelines.import_legacy"))
    ok(legacy.replace("output_dir=/data/shards", "output_dir=/data/shards-legacy"))  # beside the other set
    ran[-1] = legacy

    # Data in object storage: preprocessing into a bucket, then the recipe trains from it (and the validation
    # shards' brace range) on the real S3 server; the store's secret is in no file of the run.
    s3.bucket("speech")
    remote = next(c for c in commands if c.startswith("python -m data_pipelines.preprocess") and "s3://" in c)
    done = ok(remote, "progress=false")
    assert "published to s3://speech/moss/shards" in done.stdout, done.stdout
    s3.upload(Path(replacements["data.train_shards=..."].split("=", 1)[1]), "s3://speech/moss/shards")
    write_shards(generate_samples(16, seed=2), tmp_path / "val4", prefix="shard", max_samples=4)
    s3.upload(tmp_path / "val4", "s3://speech/moss/val")
    from_store = next(c for c in commands if c.startswith("python train.py " + GPU_EXPERIMENT) and "s3://" in c)
    ok(from_store, *CPU_INSTEAD, "trainer.max_steps=2", "name=lora-s3")
    for path in (work / "runs" / "lora-s3").rglob("*"):
        assert not path.is_file() or s3.env["AWS_SECRET_ACCESS_KEY"].encode() not in path.read_bytes(), path

    # Untranscribed recordings -> tagged records (tiny random models: their confidence floors off).
    floors = ["windows.min_asr_confidence=0", "windows.min_diarisation_confidence=0", "windows.min_seconds=0.1"]
    transcribe = next(c for c in commands if c.startswith("python -m data_pipelines.transcribe"))
    done = ok(transcribe, "vad.threshold=0.1", "asr_language=en", "progress=false", *floors)
    assert "transcribed 1 of 1 recordings" in done.stdout, done.stdout
    written = tmp_path / "data" / "transcribed"
    assert (written / "records.jsonl").read_text() or (written / "monologues.jsonl").read_text()

    # From raw JSONL + audio in one command: the demo corpus, then preprocessing + epochs + best export.
    ok(next(c for c in commands if c.startswith("python -m data_pipelines.demo_corpus")))
    raw = next(c for c in commands if c.startswith("python train.py raw.train="))
    done = ok(raw)
    assert (work / "runs" / "from-raw" / "shards" / "train" / "plan.json").is_file()
    trained = float(re.search(r"epochs: +([\d.]+) trained", done.stdout).group(1))
    assert 9.5 <= trained <= 10.5 and "weights:       best.ckpt" in done.stdout, done.stdout

    # One-speaker recordings (the demo corpus's monologues) -> cloning pairs and spliced dialogues.
    for command in [c for c in commands if c.startswith("python -m data_pipelines.single_speaker")]:
        done = ok(command)
        assert re.search(r"(pairs|dialogues): [1-9]\d* records", done.stdout), done.stdout

    not_run = {c for c in commands if any(c.startswith(prefix) for prefix in NOT_RUN)}
    assert set(commands) - not_run - set(ran) == set(), "documented but neither run nor skipped with a reason"
    assert snapshot(tmp_path / "user") == user  # nothing was written into the user's folders
    folders = ["demo", "dialogues", "eval", "exported", "out", "pairs", "runs", "try"]
    assert sorted(p.name for p in work.iterdir()) == folders
