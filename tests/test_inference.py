"""infer.py end to end: the original pipeline's audio (golden), streaming = batch, checkpoints of every kind,
and bad input reported while the rest of the batch is produced."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from infer import infer
from moss.cli import usage_error_behind
from moss.inference import ItemError, parse_item
from moss.model import ConfigError
from moss.model.checkpoint import load_model
from tests.conftest import REPO, compose_config, requires_golden


def infer_cfg(tmp_path, golden, **overrides):
    cfg = compose_config("infer", ["checkpoint=x", "output_dir=x"])
    cfg.checkpoint = str(golden / "backbone" / "model")
    cfg.tokenizer = str(golden / "tokenizer")
    cfg.codec.config = str(golden / "codec" / "xy_tokenizer_tiny_config.yaml")
    cfg.codec.checkpoint = str(golden / "codec" / "xy_tokenizer_tiny.ckpt")
    cfg.output_dir, cfg.progress, cfg.attn_implementation = str(tmp_path / "out"), False, "eager"
    # sampling and max_seconds stay null: the checkpoint's generation_config.json (greedy, max_new_tokens 12)
    # is what the original pipeline generated with.
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture
def pipeline_inputs(tmp_path, golden):
    p = load_file(golden / "pipeline" / "v05final" / "pipeline.safetensors")
    for name in ("shared", "p1", "p2"):
        sf.write(tmp_path / f"{name}.wav", p[f"prompt_wav_{name}"].numpy(), 16000, subtype="FLOAT")
    items = json.loads((golden / "pipeline" / "v05final" / "pipeline.json").read_text())["jsonl_items"]
    lines = [json.dumps({k: v for k, v in item.items() if k != "base_path"}) for item in items]
    lines.insert(1, json.dumps({"text": "[S1]hi", "prompt_audio": "absent.wav", "prompt_text": "[S1]x"}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "in.jsonl", p


@requires_golden
def test_reproduces_the_original_pipeline_and_reports_the_bad_line(tmp_path, golden, pipeline_inputs):
    jsonl, p = pipeline_inputs
    results = infer(infer_cfg(tmp_path, golden, input=str(jsonl), batch_size=4, subtype="FLOAT"))
    assert [r.index for r in results] == [0, 1, 2] and "absent.wav not found" in results[1].error
    for k, res in zip((0, 1), (results[0], results[2]), strict=True):
        audio, rate = sf.read(res.path, dtype="float32")
        assert rate == 32000 and res.duration_s == pytest.approx(len(audio) / 32000)
        np.testing.assert_allclose(audio, p[f"audio{k}"].numpy(), atol=1e-5)  # wav float32 via soundfile
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert lines[0]["normalized_text"] == "[S1]你好。好的。[S2]OK." and "error" in lines[1]


@requires_golden
def test_streaming_writes_the_same_audio(tmp_path, golden, pipeline_inputs):
    jsonl, _ = pipeline_inputs
    batch = infer(infer_cfg(tmp_path / "a", golden, input=str(jsonl), subtype="FLOAT"))
    stream = infer(infer_cfg(tmp_path / "b", golden, input=str(jsonl), streaming=True, format="flac"))
    for a, b in zip(batch, stream, strict=True):
        assert (a.error is None) == (b.error is None)
        if a.error is None:
            wa, _ = sf.read(a.path, dtype="float32")
            wb, _ = sf.read(b.path, dtype="float32")
            np.testing.assert_allclose(wa, wb, atol=1e-4)  # flac is 16-bit
            assert b.first_audio_s is not None and b.first_audio_s > 0


def test_item_errors(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    with pytest.raises(ItemError, match="empty text"):
        parse_item({"text": "  "}, 0)
    with pytest.raises(ItemError, match=r"unknown speaker tags \['\[S3\]'\]"):
        parse_item({"text": "[S1]a[S3]b"}, 0)
    with pytest.raises(ItemError, match="prompt audio .*missing.wav not found"):
        parse_item({"text": "[S1]a", "prompt_audio": "missing.wav", "prompt_text": "[S1]x"}, 0, str(tmp_path))
    with pytest.raises(ItemError, match="need both"):
        parse_item({"text": "[S1]a", "prompt_audio_speaker1": "a.wav"}, 0, str(tmp_path))
    item = parse_item(
        {
            "text": "[S2]b",
            "prompt_audio_speaker1": "a.wav",
            "prompt_text_speaker1": "A",
            "prompt_audio_speaker2": "a.wav",
            "prompt_text_speaker2": "B",
        },
        3,
        str(tmp_path),
        0.5,
    )
    assert item.text == "[S1]A[S2]B[S2]b" and len(item.prompt_audio) == 3200 + 8000


def test_checkpoint_kinds_and_foreign_models(tmp_path, tiny_tokenizer):
    from moss.model import MossTTSD, MossTTSDConfig
    from moss.model.lora import apply_lora
    from moss.training.export import save_adapter

    base = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0)
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    model, tok = load_model(tmp_path / "base")
    assert tok.pad_token_id == 368 and isinstance(model, MossTTSD)
    adapted = apply_lora(MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0), r=4)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    save_adapter(adapted, tmp_path / "adapter")
    merged, _ = load_model(tmp_path / "adapter", base_model=str(tmp_path / "base"))
    ids = torch.randint(0, 1000, (1, 6, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(ids).logits[0], adapted.eval()(ids, output_logits=True).logits[0], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ConfigError, match="without a recorded base model"):
        load_model(tmp_path / "adapter")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ConfigError, match="not a MOSS-TTSD config"):
        load_model(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="neither an HF-format folder"):
        load_model(tmp_path / "nothing")


@pytest.mark.slow  # several processes (CI runs slow tests too)
def test_cli_from_a_lightning_checkpoint_of_a_tiny_run(tmp_path):
    import subprocess
    import sys

    import yaml

    from moss.codec import XYTokenizer, XYTokenizerConfig

    config = XYTokenizerConfig.tiny()
    (tmp_path / "codec.yaml").write_text(yaml.safe_dump({"generator_params": config.params}))
    torch.save(XYTokenizer.from_config(config, seed=0).state_dict(), tmp_path / "codec.ckpt")
    run = subprocess.run(
        [sys.executable, "train.py", "debug=fast_dev_run", f"paths.root={tmp_path}", "name=t", "data.num_workers=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = subprocess.run(
        [
            sys.executable,
            "infer.py",
            f"checkpoint={tmp_path}/t/checkpoints/last.ckpt",
            f"codec.config={tmp_path}/codec.yaml",
            f"codec.checkpoint={tmp_path}/codec.ckpt",
            "text='[S1]hello there[S2]fine'",
            f"output_dir={tmp_path}/out",
            "max_seconds=2",
            "progress=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (result,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    audio, rate = sf.read(result["path"])
    assert rate == 32000 and len(audio) == round(result["duration_s"] * 32000) and len(audio) % 2560 == 0
    assert "wrote 1 of 1 items" in out.stdout
    # the same checkpoint exported as an HF folder gives the run's exported weights
    export = subprocess.run(
        [
            sys.executable,
            "export.py",
            f"checkpoint={tmp_path}/t/checkpoints/last.ckpt",
            f"output_dir={tmp_path}/exported",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    ours, run_export = (
        load_file(tmp_path / "exported" / "model.safetensors"),
        load_file(tmp_path / "t" / "export" / "model.safetensors"),
    )
    assert ours.keys() == run_export.keys() and all(torch.equal(ours[k], run_export[k]) for k in ours)


def test_audio_samples_during_training(tmp_path):
    import yaml

    from moss.codec import XYTokenizer, XYTokenizerConfig
    from tests.conftest import compose_train
    from train import train

    config = XYTokenizerConfig.tiny()
    (tmp_path / "codec.yaml").write_text(yaml.safe_dump({"generator_params": config.params}))
    torch.save(XYTokenizer.from_config(config, seed=0).state_dict(), tmp_path / "codec.ckpt")
    # A voice-cloning script (one prompt per speaker, paths relative to the JSONL) with its expected length.
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        sf.write(tmp_path / f"{name}.wav", 0.1 * rng.standard_normal(8000).astype(np.float32), 16000)
    clone = {
        "text": "[S1]Good morning.[S2]Morning!",
        "prompt_audio_speaker1": "a.wav",
        "prompt_text_speaker1": "Hello.",
        "prompt_audio_speaker2": "b.wav",
        "prompt_text_speaker2": "Hi.",
        "expected_seconds": 0.5,
    }
    (tmp_path / "scripts.jsonl").write_text(json.dumps(clone) + "\n")
    cfg = compose_train(
        tmp_path,
        [
            f"callbacks.audio_samples.scripts={tmp_path / 'scripts.jsonl'}",
            "debug=fast_dev_run",
            "data.num_workers=0",
            "callbacks=audio_samples",
            f"callbacks.audio_samples.codec_config={tmp_path / 'codec.yaml'}",
            f"callbacks.audio_samples.codec_checkpoint={tmp_path / 'codec.ckpt'}",
            "callbacks.audio_samples.every_n_steps=2",
            "callbacks.audio_samples.max_seconds=1",
            "callbacks.audio_samples.sampling.do_sample=true",
            "logger=tensorboard",
            "export.enabled=false",
        ],
    )
    result = train(cfg)
    samples = sorted(p.name for p in (result["output_dir"] / "samples").iterdir())
    assert samples == ["step_0000002_0.wav", "step_0000002_1.wav", "step_0000004_0.wav", "step_0000004_1.wav"]
    assert any(sf.info(result["output_dir"] / "samples" / s).frames > 0 for s in samples)  # audio reached the logger
    assert list((result["output_dir"] / "tensorboard").rglob("events.out.tfevents*"))
    logged = result["trainer"].callback_metrics
    seconds = sf.info(result["output_dir"] / "samples" / "step_0000004_1.wav").duration
    assert float(logged["samples/duration_ratio_1"]) == pytest.approx(seconds / 0.5, rel=1e-3)
    assert float(logged["samples/hit_limit_1"]) == float(seconds >= 0.99) and "samples/duration_ratio_0" not in logged
    # A script that cannot be synthesised stops the run before it starts, naming its line.
    (tmp_path / "bad.jsonl").write_text(json.dumps({**clone, "prompt_audio_speaker2": "missing.wav"}) + "\n")
    cfg.callbacks.audio_samples.scripts = str(tmp_path / "bad.jsonl")
    with pytest.raises(Exception, match=r"bad.jsonl, line 1: prompt audio .*missing.wav not found") as err:
        instantiate(cfg.callbacks.audio_samples)
    assert isinstance(usage_error_behind(err.value), ConfigError)  # what the command line prints as one error line


def fuzz_items(folder, bad: int = 1000, seed: int = 0) -> tuple[bytes, set[int]]:
    """Inference JSONL bytes: `bad` malformed items among valid ones; returns (content, valid item indices)."""
    import os
    import random

    rng = random.Random(seed)
    sf.write(folder / "ok.wav", (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    nan = np.full(16000, np.nan, np.float32)
    sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(folder / "one.wav", np.ones(1, np.float32) * 0.1, 16000)
    (folder / "zero.wav").write_bytes(b"")
    (folder / "dir.wav").mkdir()
    if not (folder / "loop.wav").is_symlink():
        os.symlink("loop.wav", folder / "loop.wav")
    bad_audio = ["nan.wav", "one.wav", "zero.wav", "dir.wav", "loop.wav", "/dev/zero", "missing.wav", "x" * 5000]
    wrong = [None, 1, 2.5, True, [], ["a"], {}, {"a": 1}]
    good = [
        {"text": "[S1]hello[S2]hi"},
        {"text": "[S1]line\u2028separator inside[S2]ok"},
        {"text": "[S2]go on", "prompt_audio": "ok.wav", "prompt_text": "[S1]a prompt"},
    ]
    lines, valid = [], set()
    while len(lines) - len(valid) < bad:
        if rng.random() < 0.01 and len(valid) < 6:
            valid.add(len(lines))
            lines.append(json.dumps(rng.choice(good), ensure_ascii=False).encode())
            continue
        kind = rng.randrange(8)
        shared = {"text": "[S1]x", "prompt_audio": "ok.wav", "prompt_text": "[S1]p"}
        if kind == 0:
            item = dict(rng.choice(good + [shared]))  # one field of a wrong type (null would be valid)
            item[rng.choice(sorted(item) + ["base_path"])] = rng.choice(wrong[1:])
        elif kind == 1:
            item = shared | {"prompt_audio": rng.choice(bad_audio)}
        elif kind == 2:
            item = {"text": "[S1]a", "prompt_audio_speaker1": rng.choice(bad_audio + ["ok.wav"])}
        elif kind == 3:
            item = {"text": rng.choice(["", "  ", "[S3]who", "[S1]ok\ud800"])}
        elif kind == 4:
            lines.append(rng.choice([b"{", b"[1]", b"42", b'"s"', b"\xff\xfe{}", b"[" * 50000, b'{"text": 1e999999}']))
            continue
        elif kind == 5:
            item = shared | {"prompt_text": rng.choice(wrong[1:])}
        elif kind == 6:
            item = {"text": "[S1]x", "prompt_audio_speaker1": "ok.wav", "prompt_audio_speaker2": rng.choice(bad_audio)}
        else:
            item = {"text": "[S1]x", "base_path": rng.choice(wrong[1:]), "prompt_audio": "ok.wav", "prompt_text": ""}
        lines.append(json.dumps(item).encode())
    return b"\n".join(lines) + b"\n", valid


def test_a_thousand_malformed_items_never_cost_the_good_ones(tmp_path, tiny_inference):
    content, valid = fuzz_items(tmp_path)
    (tmp_path / "in.jsonl").write_bytes(content)
    results = infer(OmegaConf.merge(tiny_inference, {"input": str(tmp_path / "in.jsonl")}))
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == len(results) == content.count(b"\n") and [r.index for r in results] == list(range(len(lines)))
    # Every valid item reaches the model (a random tiny model may end some scripts at once: reported, not a pass).
    reached = {r.index for r in results if r.error is None or r.error.startswith("generated no audio")}
    assert reached == valid, [(r.index, r.error) for r in results if r.index in valid ^ reached]
    produced = [r for r in results if r.error is None]
    assert produced and all(r.duration_s > 0 and sf.info(r.path).frames > 0 for r in produced)


def test_results_are_written_when_the_run_stops(tmp_path, tiny_inference, monkeypatch):
    from moss.inference import Synthesizer

    (tmp_path / "in.jsonl").write_text('{"text": "[S1]a"}\n{"text": 5}\n{"text": "[S1]b"}\n')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Synthesizer, "synthesize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        infer(OmegaConf.merge(tiny_inference, {"input": str(tmp_path / "in.jsonl")}))
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [x["error"] for x in lines] == ["not synthesised: the run stopped", "text must be a string, got int"] * 1 + [
        "not synthesised: the run stopped"
    ]


def test_release_v07_decodes_behind_the_prompt(tmp_path, tiny_inference):
    """release=v07: v0.7 normalisation and the prompt-augmented decode (same codes, other samples, same length
    as the plain decode up to one cross-fade); streaming with it is refused before anything loads."""
    from moss.codec.prompt_decode import CROSSFADE_SECONDS

    sf.write(tmp_path / "p.wav", 0.1 * np.random.default_rng(1).standard_normal(24000).astype(np.float32), 16000)
    item = {"text": "[S1]Ha  ha, yes!", "prompt_audio": str(tmp_path / "p.wav"), "prompt_text": "[S1]Well."}
    (tmp_path / "in.jsonl").write_text(json.dumps(item) + "\n")
    settings = {"input": str(tmp_path / "in.jsonl"), "subtype": "FLOAT", "max_seconds": 12, "normalize": "v0.7"}
    base = OmegaConf.merge(tiny_inference, settings)
    v07 = compose_config("infer", ["checkpoint=x", "output_dir=x", "release=v07"])
    assert (v07.normalize, v07.decode, v07.max_seconds) == ("v0.7", "prompt_augmented", 1700)
    plain = infer(OmegaConf.merge(base, {"output_dir": str(tmp_path / "a"), "decode": "windows"}))
    behind = infer(OmegaConf.merge(base, {"output_dir": str(tmp_path / "b"), "decode": "prompt_augmented"}))
    assert plain[0].error is None and behind[0].error is None
    wa, rate = sf.read(plain[0].path, dtype="float32")
    wb, _ = sf.read(behind[0].path, dtype="float32")
    assert 0 <= len(wa) - len(wb) <= CROSSFADE_SECONDS * rate and not np.allclose(wa[: len(wb)], wb, atol=1e-4)
    line = json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[0])
    assert line["normalized_text"] == "[S1]Well.[laugh], yes!"
    with pytest.raises(ConfigError, match="decode=prompt_augmented needs the whole output"):
        infer(OmegaConf.merge(base, {"streaming": True, "decode": "prompt_augmented"}))
