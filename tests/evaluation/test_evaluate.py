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

from moss.evaluation.speech_models import Transcriber, Transcript, VoiceEmbedder
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


def whisper_confidence_by_hand(asr, wave, text, language):
    """The mean probability of `text`'s tokens, a token at a time in float64 (no batch, no padding, no cache).

    `language` None: an English-only Whisper, whose prompt has no language or task token."""
    import copy

    model, config = copy.deepcopy(asr.pipe.model).double(), asr.pipe.model.generation_config
    features = asr.pipe.feature_extractor(wave, sampling_rate=16000, return_tensors="pt").input_features.double()
    if language is None:
        prompt = [config.decoder_start_token_id, config.no_timestamps_token_id]
    else:
        task = config.task_to_id["transcribe"]
        prompt = [config.decoder_start_token_id, language, task, config.no_timestamps_token_id]
    tokens = asr.pipe.tokenizer(" " + text, add_special_tokens=False).input_ids if text else []
    probs = []
    with torch.no_grad():
        for n, token in enumerate(tokens):
            logits = model(features, decoder_input_ids=torch.tensor([prompt + tokens[:n]])).logits[0, -1]
            logits[list(config.suppress_tokens)] = -torch.inf  # the distribution Whisper's decoding picks from
            if n == 0:
                logits[list(config.begin_suppress_tokens)] = -torch.inf
            probs.append(float(logits.softmax(-1)[token]))
    return float(np.mean(probs)) if probs else 0.0


@pytest.mark.slow
def test_the_whisper_confidence_scores_the_transcript_it_kept(tiny_whisper, tmp_path):
    """One teacher-forced pass over the transcripts the decoding kept, batched and padded, against a float64
    recomputation a token at a time; the language given or detected; none unless asked; 30 s at most."""
    import shutil

    folder = shutil.copytree(tiny_whisper, tmp_path / "whisper")
    settings = json.loads((folder / "generation_config.json").read_text())
    settings.update(suppress_tokens=list(range(40, 60)), begin_suppress_tokens=[32, 101])
    (folder / "generation_config.json").write_text(json.dumps(settings))
    waves = [np.random.default_rng(n).standard_normal(16000 * n).astype(np.float32) * 0.1 for n in (2, 5, 3)]
    asr = Transcriber(str(folder), batch_size=2, language="en")
    heard = asr(waves, 16000, confidence=True)
    english = asr.pipe.model.generation_config.lang_to_id["<|en|>"]
    expected = [whisper_confidence_by_hand(asr, w, t.text, english) for w, t in zip(waves, heard, strict=True)]
    np.testing.assert_allclose([t.confidence for t in heard], expected, rtol=1e-4)
    assert all(t.confidence is None for t in asr(waves, 16000))  # not asked, not computed
    # transcripts of different lengths share a padded batch; an empty one is nothing heard
    made = [Transcript(text, None) for text in ("well then", "so what did you make of it, honestly?", "")]
    expected = [whisper_confidence_by_hand(asr, w, t.text, english) for w, t in zip(waves, made, strict=True)]
    assert expected[2] == 0.0 and expected[0] != expected[1]
    np.testing.assert_allclose(asr._confidences(waves, made), expected, rtol=1e-4)

    detecting = Transcriber(str(folder), batch_size=2)
    features = asr.pipe.feature_extractor(waves, sampling_rate=16000, return_tensors="pt").input_features
    detected = detecting.pipe.model.detect_language(features).tolist()
    scores = detecting._confidences([detecting._clip(w, 16000) for w in waves], heard)
    expected = [whisper_confidence_by_hand(asr, w, t.text, d) for w, t, d in zip(waves, heard, detected, strict=True)]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="up to Whisper's 30 s"):
        asr([np.zeros(16000 * 31, np.float32)], 16000, confidence=True)
    with pytest.raises(ValueError, match="does not know the language 'klingon'"):
        Transcriber(str(folder), language="klingon")

    settings.update(lang_to_id=None, task_to_id=None, is_multilingual=False)  # an English-only Whisper
    (folder / "generation_config.json").write_text(json.dumps(settings))
    english_only = Transcriber(str(folder), batch_size=2)
    expected = [whisper_confidence_by_hand(english_only, w, t.text, None) for w, t in zip(waves, made, strict=True)]
    np.testing.assert_allclose(english_only._confidences(waves, made), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="English-only: leave the language unset"):
        Transcriber(str(folder), language="en")


def test_the_ctc_confidence_is_the_mean_probability_of_the_frames_it_read(tiny_asr):
    waves = [np.random.default_rng(n).standard_normal(16000 * n).astype(np.float32) * 0.1 for n in (2, 3)]
    ctc = Transcriber(str(tiny_asr))
    inputs = ctc.pipe.feature_extractor(waves[0], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        probs = ctc.pipe.model(**inputs).logits[0].double().softmax(-1).numpy()
    heard = probs.argmax(-1) != ctc.pipe.model.config.pad_token_id
    confidence = ctc(waves[:1], 16000, confidence=True)[0].confidence
    assert confidence == pytest.approx(probs.max(-1)[heard].mean() if heard.any() else 0.0, rel=1e-5)


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
