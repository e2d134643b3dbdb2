"""Single-speaker corpora -> voice-cloning pairs and spliced dialogues: deterministic, reported, preprocessable."""

import json
import re

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from data_pipelines.preprocess import preprocess, preprocess_config
from data_pipelines.single_speaker import single_speaker
from moss.audio import read_audio
from tests.conftest import compose_config

SECONDS = {"a": [1.0, 2.5, 4.0, 6.0], "b": [1.5, 3.0, 3.5, 5.0], "c": [2.0, 2.2, 8.0, 4.5], "solo": [3.0]}


@pytest.fixture
def monologues(tmp_path):
    """4 speakers (one with a single utterance), unique texts, and three lines that cannot be used."""
    (tmp_path / "wav").mkdir()
    lines, rng = [], np.random.default_rng(0)
    for speaker, durations in SECONDS.items():
        for k, seconds in enumerate(durations):
            name = f"wav/{speaker}{k}.wav"
            sf.write(tmp_path / name, 0.1 * rng.standard_normal(int(seconds * 16000)).astype(np.float32), 16000)
            lines.append(
                json.dumps({"file_path": name, "full_transcript": f"[S1]{speaker} says {k}.", "speaker": speaker})
            )
    lines[3:3] = ["{not json", json.dumps({"file_path": "wav/missing.wav", "text": "hi", "speaker": "a"})]
    lines.append(json.dumps({"file_path": "wav/a0.wav", "text": "no speaker"}))
    (tmp_path / "mono.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "mono.jsonl"


def run(monologues, out, mode, **settings):
    cfg = compose_config("single_speaker", [f"input={monologues}", f"output_dir={out}", f"mode={mode}"])
    return single_speaker(OmegaConf.merge(cfg, settings))


def test_cloning_pairs(tmp_path, monologues):
    report = run(monologues, tmp_path / "p", "pairs", pairs={"reference_seconds": [2, 5]})
    pairs = [json.loads(x) for x in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]

    def speaker_of(path: str) -> str:  # wav/<speaker><k>.wav
        return re.fullmatch(r"(\w+?)\d+\.wav", path.rsplit("/", 1)[1]).group(1)

    for pair in pairs:
        assert speaker_of(pair["reference_audio"]) == speaker_of(pair["audio"]) == pair["speaker"]
        assert pair["reference_audio"] != pair["audio"] and 2 <= sf.info(pair["reference_audio"]).duration <= 5
        assert pair["text"].startswith("[S1]") and pair["reference_text"].startswith("[S1]")
    # Every usable utterance is a target, except where no other utterance of its speaker fits the window.
    assert report["records"] == len(pairs) == 12 and report["utterances"] == 13
    reasons = {s["line"]: s["reason"] for s in report["skipped"]}
    assert "JSONDecodeError" in reasons[4] and "missing.wav" in reasons[5] and "speaker" in reasons[16]
    assert "no other utterance of solo" in reasons[15]
    assert report["hours"] == pytest.approx(sum(p["seconds"] for p in pairs) / 3600)
    run(monologues, tmp_path / "q", "pairs", pairs={"reference_seconds": [2, 5]})  # deterministic
    assert (tmp_path / "q" / "pairs.jsonl").read_bytes() == (tmp_path / "p" / "pairs.jsonl").read_bytes()


def test_spliced_dialogues(tmp_path, monologues):
    report = run(monologues, tmp_path / "d", "dialogues", dialogues={"turns": [2, 3], "gap_seconds": 0.25})
    dialogues = [json.loads(x) for x in (tmp_path / "d" / "dialogues.jsonl").read_text().splitlines()]
    texts = {f"{s} says {k}.": (s, k) for s, durations in SECONDS.items() for k in range(len(durations))}
    used = []
    for d in dialogues:
        turns = [t for t in d["full_transcript"].split("[S") if t]
        assert [t[0] for t in turns] == ["1", "2", "1"][: len(turns)] and len(turns) >= 2
        who = [texts[t[2:]] for t in turns]
        assert who[0][0] != who[1][0] and all(w[0] == who[i % 2][0] for i, w in enumerate(who))  # two voices alternate
        used += who
        # The audio is the turns' own audio, 0.25 s of silence between them.
        gap = np.zeros(4000, np.float32)
        pieces = [read_audio(monologues.parent / f"wav/{s}{k}.wav") for s, k in who]
        expected = np.concatenate([x for piece in pieces for x in (piece, gap)][:-1])
        np.testing.assert_allclose(read_audio(tmp_path / "d" / d["file_path"]), expected, atol=1e-4)
    assert len(used) == len(set(used)) and report["records"] == len(dialogues) > 0
    run(monologues, tmp_path / "e", "dialogues", dialogues={"turns": [2, 3], "gap_seconds": 0.25})  # deterministic
    assert (tmp_path / "e" / "dialogues.jsonl").read_bytes() == (tmp_path / "d" / "dialogues.jsonl").read_bytes()
    assert (tmp_path / "e" / dialogues[0]["file_path"]).read_bytes() == (
        tmp_path / "d" / dialogues[0]["file_path"]
    ).read_bytes()


def test_both_outputs_preprocess_into_shards(tmp_path, monologues):
    run(monologues, tmp_path / "p", "pairs", pairs={"reference_seconds": [2, 5]})
    run(monologues, tmp_path / "d", "dialogues")
    inputs = [tmp_path / "p" / "pairs.jsonl", tmp_path / "d" / "dialogues.jsonl"]
    summary = preprocess(
        preprocess_config(inputs, tmp_path / "s", {"tiny": True, "seed": 0, "name": "t"}, progress=False)
    )
    made = sum(len((tmp_path / x).read_text().splitlines()) for x in ("p/pairs.jsonl", "d/dialogues.jsonl"))
    assert summary["samples"] == made and summary["skipped"] == 0
