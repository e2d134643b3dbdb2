"""A small raw corpus (WAV files + JSONL) to try the whole workflow from raw data on a fresh machine.

    python -m data_pipelines.demo_corpus output_dir=demo/

Each speaker "says" a word as a short chord whose pitches depend on the word and the speaker, so the audio
follows the transcript. Writes, under `output_dir`:

* `train.jsonl`, `val.jsonl`: dialogues in the original fine-tuning format 1 (`file_path`, `full_transcript`);
* `monologues.jsonl`: one-speaker utterances with a `speaker` id (for `data_pipelines.single_speaker`);
* `audio/*.wav` (16 kHz mono).

Deterministic given `seed`. Not speech: with `codec=tiny` (random weights) it exercises every step of the
pipeline, which is all it is for.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import soundfile as sf
from omegaconf import DictConfig

from moss.audio import SAMPLE_RATE
from moss.cli import command, fail, require, run
from moss.outputs import OutputFolder
from moss.text.tiny_tokenizer import TINY_WORDS

WORD_SECONDS = 0.3


def _word_wave(word: str, speaker: int, rng: np.random.Generator) -> np.ndarray:
    base = 110.0 * 2 ** (speaker / 3)  # a speaker's register
    pitches = [base * 2 ** (((sum(map(ord, word)) * (k + 3)) % 24) / 12) for k in range(3)]
    t = np.arange(int(WORD_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(np.sin(2 * np.pi * p * t) for p in pitches) / 3
    envelope = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # no clicks between words
    return (0.3 * wave * envelope + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


def _utterance(speakers: list[int], rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A transcript with `[S1]`/`[S2]` turns for `speakers` (alternating) and its audio."""
    text, audio = "", []
    for turn, speaker in enumerate(speakers):
        words = list(rng.choice(TINY_WORDS, size=int(rng.integers(2, 6))))
        text += f"[S{1 + turn % 2}]" + " ".join(words) + "."
        audio += [_word_wave(w, speaker, rng) for w in words] + [np.zeros(SAMPLE_RATE // 10, np.float32)]
    return text, np.concatenate(audio)


def write_demo_corpus(
    output_dir: str | Path,
    dialogues: int = 48,
    val: int = 8,
    speakers: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the corpus (see the module docstring); returns the paths of the three JSONL files.

    `output_dir` must be new, empty or an earlier demo corpus (replaced only with `overwrite`).
    """
    folder = OutputFolder(output_dir, "demo_corpus", overwrite=overwrite).check()
    with folder.staged() as stage:
        names = _write(stage, dialogues, val, speakers, seed)
    return {name: Path(output_dir) / file for name, file in names.items()}


def _write(out: Path, dialogues: int, val: int, speakers: int, seed: int) -> dict[str, str]:
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {"train": [], "val": [], "monologues": []}
    for i in range(dialogues + val):
        pair = [int(s) for s in rng.choice(speakers, size=2, replace=False)]
        text, wave = _utterance([pair[t % 2] for t in range(int(rng.integers(2, 5)))], rng)
        sf.write(out / "audio" / f"dialogue-{i:04d}.wav", wave, SAMPLE_RATE)
        record = {"file_path": f"audio/dialogue-{i:04d}.wav", "full_transcript": text}
        lines["train" if i < dialogues else "val"].append(json.dumps(record, ensure_ascii=False))
    for i in range(dialogues):
        speaker = i % speakers
        text, wave = _utterance([speaker] * int(rng.integers(3, 7)), rng)  # 3-9 s: references need 3 s
        text = "[S1]" + text.replace("[S1]", "").replace("[S2]", " ")
        sf.write(out / "audio" / f"monologue-{i:04d}.wav", wave, SAMPLE_RATE)
        record = {"file_path": f"audio/monologue-{i:04d}.wav", "full_transcript": text, "speaker": f"spk{speaker}"}
        lines["monologues"].append(json.dumps(record, ensure_ascii=False))
    for name, rows in lines.items():
        (out / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return {name: f"{name}.jsonl" for name in lines}


@hydra.main(version_base="1.3", config_path="../conf", config_name="demo_corpus")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m data_pipelines.demo_corpus output_dir=demo/`."""
    fail("invalid demo corpus command", require(cfg, {"output_dir": "demo/"}))
    paths = write_demo_corpus(cfg.output_dir, cfg.dialogues, cfg.val, cfg.speakers, cfg.seed, cfg.overwrite)
    print(
        f"wrote {cfg.dialogues} + {cfg.val} dialogues and {cfg.dialogues} monologues: "
        + ", ".join(map(str, paths.values()))
    )


if __name__ == "__main__":
    run(main, Path(__file__).parents[1] / "conf", "demo_corpus")
