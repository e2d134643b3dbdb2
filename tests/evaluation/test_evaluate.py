"""evaluate.py end to end on the CPU: two tiny checkpoints, a tiny codec, tiny random ASR and speaker models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from moss.evaluation.judges import Transcriber, VoiceEmbedder
from tests.conftest import REPO, compose_config


@pytest.fixture
def heldout(tmp_path, tiny_tokenizer):
    """Two tiny checkpoints (tuned, base), a tiny codec and held-out scripts with per-speaker prompts."""
    from moss.codec import XYTokenizer, XYTokenizerConfig
    from moss.model import MossTTSD, MossTTSDConfig

    for name, seed in (("tuned", 0), ("base", 1)):
        MossTTSD.from_config(MossTTSDConfig.tiny(), seed=seed).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    config = XYTokenizerConfig.tiny()
    (tmp_path / "codec.yaml").write_text(yaml.safe_dump({"generator_params": config.params}))
    torch.save(XYTokenizer.from_config(config, seed=0).state_dict(), tmp_path / "codec.ckpt")
    rng = np.random.default_rng(0)
    for n in (1, 2):
        sf.write(tmp_path / f"s{n}.wav", (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000)
    voices = {"prompt_audio_speaker1": "s1.wav", "prompt_audio_speaker2": "s2.wav"}
    lines = [
        {"text": "[S1]hello there[S2]hi how are you[S1]fine", **voices, "expected_seconds": 2.0},
        {"text": "[S1]just one voice"},
        {"text": ""},  # refused by the input check: reported, never scored
    ]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return [
        f"checkpoint={tmp_path / 'tuned'}",
        f"input={tmp_path / 'heldout.jsonl'}",
        f"output_dir={tmp_path / 'eval'}",
        f"codec.config={tmp_path / 'codec.yaml'}",
        f"codec.checkpoint={tmp_path / 'codec.ckpt'}",
        "progress=false",
        "max_seconds=3",
    ]


def test_the_judges_load_by_folder_and_run_batched(tiny_asr, tiny_speaker_model):
    waves = [np.random.default_rng(i).standard_normal(24000 * (i + 1)).astype(np.float32) * 0.1 for i in range(3)]
    heard = Transcriber(str(tiny_asr), batch_size=2)(waves, 24000)
    assert len(heard) == 3 and all(isinstance(t.text, str) and t.words is not None for t in heard)
    assert all(0 <= w.start <= w.end <= (i + 1) * 1.0 + 0.05 for i, t in enumerate(heard) for w in t.words)
    embedder = VoiceEmbedder(str(tiny_speaker_model), batch_size=2)
    rows = embedder(waves, 24000)
    assert rows.shape == (3, 8) and np.isfinite(rows).all()
    np.testing.assert_allclose(embedder(waves[2:], 24000)[0], rows[2], rtol=1e-4, atol=1e-6)  # not its batch's


def test_whisper_takes_long_clips_alone_and_gives_word_times(tiny_whisper):
    # The pipeline cannot batch a clip over Whisper's 30 s window with shorter ones (its features differ in length).
    waves = [np.random.default_rng(n).standard_normal(16000 * n).astype(np.float32) * 0.1 for n in (3, 40, 5)]
    heard = Transcriber(str(tiny_whisper), batch_size=2, language="en")(waves, 16000)
    assert len(heard) == 3 and all(t.words for t in heard)
    assert all(w.start <= w.end for t in heard for w in t.words)


def test_the_asr_confidence_is_the_mean_probability_of_the_tokens_it_heard(tiny_whisper, tiny_asr):
    """Recomputed by hand: Whisper's greedy tokens scored by one teacher-forced forward; CTC's frames."""
    import torch

    waves = [np.random.default_rng(n).standard_normal(16000 * n).astype(np.float32) * 0.1 for n in (2, 3)]
    asr = Transcriber(str(tiny_whisper), batch_size=2, language="en")
    model, tokenizer = asr.pipe.model, asr.pipe.tokenizer
    expected = []
    for wave in waves:
        features = asr.pipe.feature_extractor(wave, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            out = model.generate(features, return_dict_in_generate=True, output_scores=True, **asr.generate_kwargs)
            sequence = out.sequences[0]
            logits = model(features, decoder_input_ids=sequence[None, :-1]).logits[0].double()
        prompt = len(sequence) - len(out.scores)
        # the distribution greedy decoding chose from: Whisper's suppressed tokens can never be picked
        logits[:, list(model.generation_config.suppress_tokens or [])] = -torch.inf
        logits[prompt - 1, list(model.generation_config.begin_suppress_tokens or [])] = -torch.inf
        probs = logits.softmax(-1).gather(-1, sequence[1:, None])[:, 0]
        pairs = list(zip(sequence[1:].tolist(), probs.tolist(), strict=True))[prompt - 1 :]
        kept = [p for t, p in pairs if t not in set(tokenizer.all_special_ids)]
        expected.append(float(np.mean(kept)) if kept else 0.0)
    np.testing.assert_allclose(asr.confidences(waves, 16000), expected, rtol=1e-3)
    ctc = Transcriber(str(tiny_asr))
    inputs = ctc.pipe.feature_extractor(waves[0], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        probs = ctc.pipe.model(**inputs).logits[0].double().softmax(-1).numpy()
    heard = probs.argmax(-1) != ctc.pipe.model.config.pad_token_id
    assert ctc.confidences(waves[:1], 16000)[0] == pytest.approx(probs.max(-1)[heard].mean(), rel=1e-5)


def test_evaluate_scores_both_checkpoints_on_the_same_scripts(heldout, tmp_path, tiny_whisper, tiny_speaker_model):
    from evaluate import evaluate

    judges = [f"asr_model={tiny_whisper}", "asr_language=en", f"speaker_model={tiny_speaker_model}"]
    judges.append(f"base={tmp_path / 'base'}")
    report = evaluate(compose_config("evaluate", [*heldout, *judges]))
    assert report == json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(report["checkpoints"]) == {"tuned", "base"}
    for label, run in report["checkpoints"].items():
        assert (tmp_path / "eval" / label / "output_0000.wav").is_file()
        items = {item["index"]: item for item in run["items"]}
        assert items[2]["error"] == "empty text"
        assert run["aggregate"]["items"] == 3
        scored = [item for item in items.values() if "turns" in item]
        assert all("cer" in item and "transcript" in item for item in scored)
        assert [t["speaker"] for t in items[0]["turns"]] == [1, 2, 1]
    comparison = report["comparison"]
    for metric, values in comparison.items():
        if values["delta"] is not None:
            assert values["delta"] == pytest.approx(values["tuned"] - values["base"]), metric
    assert {"cer", "wer", "duration_ratio", "hit_limit_rate"} <= set(comparison)


@pytest.mark.slow  # two commands in subprocesses (about 17 s)
def test_without_metric_models_it_says_how_to_turn_them_on(heldout, tmp_path):
    done = subprocess.run(
        [sys.executable, "evaluate.py", *heldout], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "set asr_model=openai/whisper-large-v3" in done.stderr + done.stdout
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(report["checkpoints"]) == {"tuned"} and "comparison" not in report
    assert "cer" not in report["checkpoints"]["tuned"]["aggregate"]
    again = subprocess.run([sys.executable, "evaluate.py", *heldout], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "overwrite=true" in again.stderr  # an earlier evaluation is not replaced
