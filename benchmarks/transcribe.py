"""Transcription throughput: hours of recordings per hour through `data_pipelines.transcribe`, stage by stage.

Writes `--recordings` synthetic two-voice recordings of `--seconds` each (vowel-like voices that Silero VAD hears
as speech at threshold 0.1; tests/data_pipelines/voices.py), then times, in this process: the VAD (Silero, the
real model), the diarisation and the ASR of the recordings' speech, and the whole command with 1 and with
`--workers` worker processes. Each is printed as hours of audio per hour of wall time (the real-time factor's
inverse). Then what the ASR confidence adds to the ASR's time, scoring the kept transcripts (now) against a
second decoding (before), and one line `RESULT {json}`.

Without `--asr-model`/`--speaker-model` the models are tiny random ones (transformers configs): their times say
what the pipeline itself costs around the models, not what Whisper large-v3 or WavLM cost. Name real models
(local folders or Hub ids) to measure those, on `--device cuda` for a GPU.

Usage: python benchmarks/transcribe.py [--recordings 4] [--seconds 60] [--workers 2] [--asr-model ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/transcribe.py` from anywhere
from data_pipelines.transcribe import Models, asr_pieces, transcribe, transcribe_regions  # noqa: E402
from moss.audio import SAMPLE_RATE  # noqa: E402
from tests.data_pipelines.voices import voiced  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "transcribe.yaml"


def recording(seconds: float, seed: int) -> np.ndarray:
    """Two voices taking turns of 2-6 s with pauses of 0.3-1 s."""
    rng, parts, total, turn = np.random.default_rng(seed), [], 0.0, 0
    voices = [(110, [(700, 80), (1220, 90), (2600, 120)]), (220, [(300, 60), (2300, 100), (3000, 120)])]
    while total < seconds:
        length, pause = float(rng.uniform(2, 6)), float(rng.uniform(0.3, 1.0))
        f0, formants = voices[turn % 2]
        parts += [voiced(length, f0, formants, seed=seed * 100 + turn), np.zeros(int(pause * SAMPLE_RATE), np.float32)]
        total, turn = total + length + pause, turn + 1
    return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]


def second_decoding(asr, clips: list[np.ndarray]) -> None:
    """What the ASR confidence cost before it scored the kept transcript: a second, greedy decoding with scores."""
    import torch

    model = asr.pipe.model
    with torch.inference_mode():
        for start in range(0, len(clips), asr.batch_size):
            batch = asr.pipe.feature_extractor(clips[start : start + asr.batch_size], sampling_rate=asr.rate)
            features = torch.as_tensor(np.asarray(batch.input_features)).to(model.device, model.dtype)
            out = model.generate(features, return_dict_in_generate=True, output_scores=True, **asr.generate_kwargs)
            model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recordings", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--asr-model")
    parser.add_argument("--speaker-model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not (args.asr_model and args.speaker_model):
            from tests.evaluation.conftest import build_tiny_speaker_model, build_tiny_whisper

            args.asr_model = args.asr_model or str(build_tiny_whisper(folder / "whisper"))
            args.speaker_model = args.speaker_model or str(build_tiny_speaker_model(folder / "speaker"))
        (folder / "in").mkdir()
        waves = [recording(args.seconds, seed) for seed in range(args.recordings)]
        for n, wave in enumerate(waves):
            sf.write(folder / "in" / f"rec{n}.wav", wave, SAMPLE_RATE)
        hours = len(waves) * args.seconds / 3600
        base = OmegaConf.load(CONFIG)
        cfg = OmegaConf.merge(
            OmegaConf.masked_copy(base, [k for k in base if k not in ("defaults", "hydra")]),
            {"input": str(folder / "in"), "asr_model": args.asr_model, "speaker_model": args.speaker_model},
            {"asr_language": "en", "vad": {"threshold": 0.1}, "devices": args.device, "progress": False},
        )
        models = Models(cfg, args.device)
        stages, regions = {}, []
        start = time.perf_counter()
        regions = [models.vad(w, SAMPLE_RATE) for w in waves]
        stages["vad (silero)"] = time.perf_counter() - start
        start = time.perf_counter()
        for wave, found in zip(waves, regions, strict=True):
            models.diarise(wave, SAMPLE_RATE, found)
        stages["diarisation"] = time.perf_counter() - start
        start = time.perf_counter()
        for wave, found in zip(waves, regions, strict=True):
            transcribe_regions(wave, found, models.asr)
        stages["asr (+confidence)"] = time.perf_counter() - start
        pieces = [
            [w[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b in asr_pieces(found)]
            for w, found in zip(waves, regions, strict=True)
        ]
        costs = {}
        for name, run in (
            ("asr alone", lambda clips: models.asr(clips, SAMPLE_RATE)),
            ("asr + confidence", lambda clips: models.asr(clips, SAMPLE_RATE, confidence=True)),
            (
                "asr + second decoding",
                lambda clips: (models.asr(clips, SAMPLE_RATE), second_decoding(models.asr, clips)),
            ),
        ):
            start = time.perf_counter()
            for clips in pieces:
                run(clips)
            costs[name] = time.perf_counter() - start
        for workers in (0, args.workers):
            out = folder / f"out{workers}"
            start = time.perf_counter()
            transcribe(OmegaConf.merge(cfg, {"output_dir": str(out), "workers": workers}))
            stages[f"whole command, {max(workers, 1)} process{'es' if workers > 1 else ''}"] = (
                time.perf_counter() - start
            )
    speech = sum(b - a for found in regions for a, b in found) / 3600
    rates = {name: hours / (seconds / 3600) for name, seconds in stages.items()}
    print(
        f"\n{len(waves)} recordings x {args.seconds:g} s ({hours:.3f} h, {speech / hours:.0%} speech found); "
        f"asr={args.asr_model} speaker={args.speaker_model}"
    )
    for name, rate in rates.items():
        print(f"  {name:<28}{rate:>12,.0f} h of audio per hour")
    whole = [v for k, v in rates.items() if k.startswith("whole")]
    print(f"  {args.workers} workers vs 1: {whole[1] / whole[0]:.2f}x (the spawned workers' model loading included)")
    alone = costs["asr alone"]
    overhead = {name: seconds / alone - 1 for name, seconds in costs.items() if name != "asr alone"}
    print(
        f"  ASR confidence: scoring the kept transcript adds {overhead['asr + confidence']:.0%} to the ASR's time; "
        f"a second decoding (before) added {overhead['asr + second decoding']:.0%}"
    )
    result = {"hours": hours, "hours_per_hour": rates, "speech_share": speech / hours, "confidence_overhead": overhead}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
