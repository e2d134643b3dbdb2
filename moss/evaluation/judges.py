"""The models that judge generated speech: an ASR model (what was said, and when) and a speaker embedder.

Both load by local folder or Hub id through transformers (`pipeline("automatic-speech-recognition")` for ASR:
Whisper, or any CTC model; `AutoModelForAudioXVector` for voices: WavLM/UniSpeech-SAT x-vectors), load once,
and run batched. Neither is needed for training: they are named in `eval.asr_model` / `eval.speaker_model`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from moss.audio import resample
from moss.evaluation.turns import Word

log = logging.getLogger(__name__)
WHISPER_WINDOW_S = 30  # Whisper's input window: longer clips are decoded in sequential windows, alone


@dataclass(frozen=True)
class Transcript:
    """What the ASR model heard: the text, and its words with timestamps (None when the model gives none)."""

    text: str
    words: list[Word] | None


class Transcriber:
    """Speech to text (with word times) through transformers' ASR pipeline.

    Args:
        model: local folder or Hub id (e.g. `openai/whisper-large-v3`).
        device: torch device for the model.
        batch_size: clips per forward pass.
        language: Whisper's language (e.g. `en`, `zh`); None lets Whisper detect it.
        dtype: the model's dtype (float16/bfloat16 halve its memory on a GPU).
    """

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 8, language: str | None = None, dtype=None):
        from transformers import pipeline

        self.name, self.batch_size = model, batch_size
        self.pipe = pipeline("automatic-speech-recognition", model=model, device=device, dtype=dtype)
        self.rate = self.pipe.feature_extractor.sampling_rate
        whisper = self.pipe.model.config.model_type == "whisper"
        self.generate_kwargs = {"language": language, "task": "transcribe"} if whisper and language else {}
        # Whisper transcribes long clips in its own sequential windows; a CTC model is read in 30 s chunks.
        self.chunking = {} if whisper else {"chunk_length_s": 30}
        self.timestamps = True

    def __call__(self, waves: list[np.ndarray], sample_rate: int) -> list[Transcript]:
        """Transcripts of mono clips at `sample_rate`, in order."""
        if not waves:
            return []
        clips = [self._clip(w, sample_rate) for w in waves]
        if self.timestamps:
            try:
                return [self._transcript(o) for o in self._run(clips, return_timestamps="word")]
            except (ValueError, KeyError) as err:  # e.g. a Whisper without alignment heads
                log.warning("%s gives no word timestamps (%s); turns are cut in proportion to the text", self.name, err)
                self.timestamps = False
        return [Transcript(o["text"].strip(), None) for o in self._run(clips)]

    def confidences(self, waves: list[np.ndarray], sample_rate: int) -> list[float]:
        """How sure the model is of what it hears in each clip (up to 30 s): the mean probability of its tokens.

        Whisper: of the tokens it generates (greedy, its own decoding settings), batched; a CTC model: the mean
        top probability of the frames it does not read as blank. 0.0 for a clip in which nothing is heard.
        """
        clips = [self._clip(w, sample_rate) for w in waves]
        model, extractor = self.pipe.model, self.pipe.feature_extractor
        out = []
        with torch.inference_mode():
            if model.config.model_type == "whisper":
                for start in range(0, len(clips), self.batch_size):
                    batch = extractor(
                        clips[start : start + self.batch_size], sampling_rate=self.rate, return_tensors="pt"
                    )
                    features = batch.input_features.to(model.device, model.dtype)
                    generated = model.generate(
                        features, return_dict_in_generate=True, output_scores=True, **self.generate_kwargs
                    )
                    scores = model.compute_transition_scores(
                        generated.sequences, generated.scores, normalize_logits=True
                    )
                    tokens = generated.sequences[:, -scores.shape[1] :]
                    special = set(self.pipe.tokenizer.all_special_ids)
                    for row, probs in zip(tokens.tolist(), scores.exp().float().cpu().numpy(), strict=True):
                        kept = [p for t, p in zip(row, probs, strict=True) if t not in special]
                        out.append(float(np.mean(kept)) if kept else 0.0)
            else:
                blank = model.config.pad_token_id
                for clip in clips:
                    inputs = extractor(clip, sampling_rate=self.rate, return_tensors="pt").to(model.device)
                    probs = model(**inputs).logits[0].float().softmax(-1)
                    top, ids = probs.max(-1)
                    heard = top[ids != blank]
                    out.append(float(heard.mean()) if len(heard) else 0.0)
        return out

    def _clip(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        return resample(np.asarray(wave, np.float32), sample_rate, self.rate)

    def _run(self, clips: list[np.ndarray], **kwargs) -> list[dict]:
        """The pipeline's outputs in order; Whisper's clips over 30 s go one at a time (its long-form decoding)."""
        extra = {"generate_kwargs": self.generate_kwargs} if self.generate_kwargs else {}
        single = [i for i, c in enumerate(clips) if not self.chunking and len(c) > WHISPER_WINDOW_S * self.rate]
        batched = [i for i in range(len(clips)) if i not in set(single)]
        out: dict[int, dict] = {}
        with torch.inference_mode():
            for indices, size in ((batched, self.batch_size), *(([i], 1) for i in single)):
                inputs = [{"raw": clips[i], "sampling_rate": self.rate} for i in indices]  # the pipeline empties them
                results = self.pipe(inputs, batch_size=size, **self.chunking, **extra, **kwargs) if inputs else []
                out.update(zip(indices, results, strict=True))
        return [out[i] for i in range(len(clips))]

    @staticmethod
    def _transcript(out: dict) -> Transcript:
        words = [
            Word(c["text"], float(c["timestamp"][0]), float(c["timestamp"][1] or c["timestamp"][0]))
            for c in out.get("chunks") or []
            if c.get("timestamp") and c["timestamp"][0] is not None
        ]
        return Transcript(out["text"].strip(), words)


class VoiceEmbedder:
    """Speaker embeddings (x-vectors) of clips, for voice similarity.

    Args:
        model: local folder or Hub id of an `AutoModelForAudioXVector` (e.g. `microsoft/wavlm-base-plus-sv`).
        device: torch device for the model.
        batch_size: clips per forward pass.
    """

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 8):
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

        self.name, self.device, self.batch_size = model, device, batch_size
        self.extractor = AutoFeatureExtractor.from_pretrained(model)
        self.model = AutoModelForAudioXVector.from_pretrained(model).to(device).eval()
        self.rate = self.extractor.sampling_rate

    def __call__(self, waves: list[np.ndarray], sample_rate: int) -> np.ndarray:
        """One embedding row per clip, `[len(waves), dim]` float32."""
        rows = []
        for start in range(0, len(waves), self.batch_size):
            clips = [
                resample(np.asarray(w, np.float32), sample_rate, self.rate) for w in waves[start:][: self.batch_size]
            ]
            batch = self.extractor(
                clips, sampling_rate=self.rate, padding=True, return_attention_mask=True, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                rows.append(self.model(**batch).embeddings.float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def load_judges(
    asr_model: str | None, speaker_model: str | None, device: str = "cpu", language: str | None = None, batch_size=8
) -> tuple[Transcriber | None, VoiceEmbedder | None]:
    """The metric models named (None for each one not named), loaded once on `device`."""
    return (
        Transcriber(asr_model, device, batch_size, language) if asr_model else None,
        VoiceEmbedder(speaker_model, device, batch_size) if speaker_model else None,
    )
