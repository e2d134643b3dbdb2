"""The speech models: an ASR model (what was said, and when, and how surely) and a speaker embedder.

Two uses: they judge generated speech (evaluation, the quality gate, the studio) and they turn recordings
into training records (`data_pipelines/transcribe.py`). Both load by local folder or Hub id through transformers
(`pipeline("automatic-speech-recognition")` for ASR: Whisper, or any CTC model; `AutoModelForAudioXVector` for
voices: WavLM/UniSpeech-SAT x-vectors), load once, and run batched. Training needs neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Annotated

import numpy as np
import torch
from pydantic import AfterValidator
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from moss.audio import resample
from moss.errors import first_line
from moss.evaluation.turns import Word

log = logging.getLogger(__name__)
WHISPER_WINDOW_S = 30  # Whisper's input window: longer clips are decoded in sequential windows, alone


@dataclass(frozen=True)
class Transcript:
    """What the ASR model heard: the text, its words with timestamps, how sure it is of them.

    `words` is None when the model gives no timestamps; `confidence` None unless asked for (`confidence=True`).
    """

    text: str
    words: list[Word] | None
    confidence: float | None = None


class Transcriber:
    """Speech to text (with word times) through transformers' ASR pipeline.

    Args:
        model: local folder or Hub id (e.g. `openai/whisper-large-v3`).
        device: torch device for the model.
        batch_size: clips per forward pass.
        language: Whisper's language (e.g. `en`, `zh`); None lets Whisper detect it.
        dtype: the model's dtype (float16/bfloat16 halve its memory on a GPU).
    """

    def __init__(
        self, model: str, device: str = "cpu", batch_size: int = 8, language: Language | None = None, dtype=None
    ):
        from transformers import pipeline

        self.name, self.batch_size = model, batch_size
        self.pipe = pipeline("automatic-speech-recognition", model=model, device=device, dtype=dtype)
        self.rate = self.pipe.feature_extractor.sampling_rate
        self.whisper = self.pipe.model.config.model_type == "whisper"
        self.generate_kwargs = {"language": language, "task": "transcribe"} if self.whisper and language else {}
        # Whisper transcribes long clips in its own sequential windows; a CTC model is read in 30 s chunks.
        self.chunking = {} if self.whisper else {"chunk_length_s": 30}
        self.timestamps = True
        if self.whisper:  # for scoring transcripts: read before any decoding (Whisper's generate empties them)
            config = self.pipe.model.generation_config
            self.language_id = _language_id(config, language) if language else None
            self.suppressed = set(config.suppress_tokens or [])
            self.suppressed_at_start = set(config.begin_suppress_tokens or [])

    def __call__(self, waves: list[np.ndarray], sample_rate: int, confidence: bool = False) -> list[Transcript]:
        """Transcripts of mono clips at `sample_rate`, in order; with `confidence`, how sure the model is of each.

        The confidence is the mean probability of the transcript's tokens (see `_confidences`).
        """
        if not waves:
            return []
        clips = [self._clip(w, sample_rate) for w in waves]
        heard = None
        if self.timestamps:
            try:
                heard = [self._transcript(o) for o in self._run(clips, return_timestamps="word")]
            except (ValueError, KeyError) as err:  # e.g. a Whisper without alignment heads
                log.warning("%s gives no word timestamps (%s); turns are cut in proportion to the text", self.name, err)
                self.timestamps = False
        if heard is None:
            heard = [Transcript(o["text"].strip(), None) for o in self._run(clips)]
        if not confidence:
            return heard
        scores = self._confidences(clips, heard)
        return [replace(t, confidence=c) for t, c in zip(heard, scores, strict=True)]

    def _confidences(self, clips: list[np.ndarray], heard: list[Transcript]) -> list[float]:
        """How sure the model is of what it heard in each clip: the mean probability of the transcript's tokens.

        Whisper: the transcript it kept, scored in one teacher-forced pass (no second decoding), with the
        language given or the one it detects, over the distribution its decoding picks from (suppressed tokens
        removed); clips up to its 30 s window. A CTC model: the mean top probability of the frames it does not
        read as blank (its transcript is their argmax). 0.0 for a clip in which nothing is heard.
        """
        model, extractor = self.pipe.model, self.pipe.feature_extractor
        out = []
        with torch.inference_mode():
            if self.whisper:
                for start in range(0, len(clips), size := self.batch_size):
                    out += self._whisper_scores(clips[start : start + size], heard[start : start + size])
            else:
                blank = model.config.pad_token_id
                for clip in clips:
                    inputs = extractor(clip, sampling_rate=self.rate, return_tensors="pt").to(model.device)
                    probs = model(**inputs).logits[0].float().softmax(-1)
                    top, ids = probs.max(-1)
                    seen = top[ids != blank]
                    out.append(float(seen.mean()) if len(seen) else 0.0)
        return out

    def _whisper_scores(self, clips: list[np.ndarray], heard: list[Transcript]) -> list[float]:
        model, config = self.pipe.model, self.pipe.model.generation_config
        if max(len(c) for c in clips) > WHISPER_WINDOW_S * self.rate:
            raise ValueError(f"the ASR confidence is for clips up to Whisper's {WHISPER_WINDOW_S} s: cut longer ones")
        features = self.pipe.feature_extractor(clips, sampling_rate=self.rate, return_tensors="pt").input_features
        encoded = model.get_encoder()(features.to(model.device, model.dtype))
        room = model.config.max_target_positions - 5  # the prompt's four tokens and the end token
        tokenize = self.pipe.tokenizer
        texts = [tokenize(" " + t.text, add_special_tokens=False).input_ids[:room] if t.text else [] for t in heard]
        if not getattr(config, "lang_to_id", None):  # an English-only Whisper: no language or task tokens
            prompts = [[config.decoder_start_token_id, config.no_timestamps_token_id]] * len(clips)
        else:
            languages = [self.language_id] * len(clips)
            if self.language_id is None:
                languages = model.detect_language(encoder_outputs=encoded, generation_config=config).tolist()
            task = config.task_to_id["transcribe"]
            prompts = [[config.decoder_start_token_id, lang, task, config.no_timestamps_token_id] for lang in languages]
        end = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        rows = [p + t + [end] for p, t in zip(prompts, texts, strict=True)]
        width = max(map(len, rows))
        tokens = torch.tensor([r + [end] * (width - len(r)) for r in rows], device=model.device)
        logits = model(encoder_outputs=encoded, decoder_input_ids=tokens[:, :-1]).logits.float()
        logits[..., list(self.suppressed)] = -torch.inf  # the ids Whisper's decoding never picks
        first = len(prompts[0]) - 1  # the position that predicts the first text token
        logits[:, first, list(self.suppressed_at_start)] = -torch.inf
        # log p = logit - logsumexp: no second vocabulary-wide tensor beside the logits
        picked = logits.gather(-1, tokens[:, 1:, None])[..., 0] - logits.logsumexp(-1)
        probs = picked.exp().cpu().numpy()
        return [float(np.mean(row[first : first + len(t)])) if t else 0.0 for row, t in zip(probs, texts, strict=True)]

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


def _language_code(language: str) -> str:
    """The code of a Whisper language given as a code (`en`), a name (`english`) or a token (`<|en|>`)."""
    code = TO_LANGUAGE_CODE.get(language.lower(), language.lower()).strip("<|>")
    if code not in LANGUAGES:
        raise ValueError(f"{language!r} is not a language Whisper knows; e.g. en, zh, english, chinese")
    return language


Language = Annotated[str, AfterValidator(_language_code)]  # a setting naming a Whisper language


def _language_id(config, language: str) -> int:
    """Whisper's token id for a language given as a code (`en`), a name (`english`) or a token (`<|en|>`)."""
    if not getattr(config, "lang_to_id", None):
        raise ValueError(f"this Whisper is English-only: leave the language unset (got {language!r})")
    code = TO_LANGUAGE_CODE.get(language.lower(), language.lower()).strip("<|>")
    if f"<|{code}|>" not in config.lang_to_id:
        raise ValueError(f"Whisper does not know the language {language!r}")
    return config.lang_to_id[f"<|{code}|>"]


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


def model_problem(name: str, setting: str) -> str | None:
    """Why the speech model `setting=name` cannot be loaded here (None: it can), found from its config alone.

    A machine without network reaches no Hub id that is not in its cache; that is one line with the fix, found
    before any output folder is made or any worker started.
    """
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, a folder of something else: one line
        return (
            f"{setting}={name} cannot be loaded ({first_line(err)}); give a local model folder, or a Hugging Face "
            f"Hub id this machine can download (huggingface-cli download {name} --local-dir DIR elsewhere)"
        )
    return None


def load_judges(
    asr_model: str | None, speaker_model: str | None, device: str = "cpu", language: str | None = None, batch_size=8
) -> tuple[Transcriber | None, VoiceEmbedder | None]:
    """The metric models named (None for each one not named), loaded once on `device`."""
    return (
        Transcriber(asr_model, device, batch_size, language) if asr_model else None,
        VoiceEmbedder(speaker_model, device, batch_size) if speaker_model else None,
    )
