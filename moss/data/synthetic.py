"""A generated dialogue corpus with learnable structure, for the built-in tiny default and tests.

Every word has a fixed "pronunciation": a few frames of 8 codebook codes drawn once from a seeded
generator; a speaker shifts every code by a speaker-specific offset. A dialogue's codes are the
concatenation of its words' frames, so a model can learn the text -> audio mapping (and loss falls far
below the uniform log(1025) ~ 6.9 within a minute of CPU training). About a third of the samples carry a
reference (first turn as `ref_text`/`ref_codes`), exercising the voice-cloning layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moss.data.schema import CODEBOOK_SIZE, CODEBOOKS, ShardSample
from moss.data.writer import write_shards
from moss.text.tiny_tokenizer import TINY_WORDS as WORDS

SPEAKER_SHIFT = {1: 0, 2: 517}


def _lexicon(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {w: rng.integers(0, CODEBOOK_SIZE, size=(int(rng.integers(2, 6)), CODEBOOKS)) for w in WORDS}


def _turn(words: list[str], speaker: int, lexicon: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    codes = np.concatenate([lexicon[w] for w in words]) + SPEAKER_SHIFT[speaker]
    return f"[S{speaker}]" + " ".join(words), codes % CODEBOOK_SIZE


def generate_samples(num_samples: int, seed: int = 0, lexicon_seed: int = 1234) -> Iterator[ShardSample]:
    """Yield `num_samples` synthetic dialogues (deterministic given the seeds)."""
    lexicon = _lexicon(lexicon_seed)
    rng = np.random.default_rng(seed)
    for i in range(num_samples):
        turns = [
            _turn(list(rng.choice(WORDS, size=int(rng.integers(1, 5)))), 1 + t % 2, lexicon)
            for t in range(int(rng.integers(2, 6)))
        ]
        with_ref = rng.random() < 1 / 3
        ref_text, ref_codes = (turns[0][0], turns[0][1]) if with_ref else (None, None)
        body = turns[1:] if with_ref else turns
        yield ShardSample(
            key=f"synthetic-{seed}-{i:07d}",
            codes=np.concatenate([c for _, c in body]).astype(np.int16),
            text="".join(t for t, _ in body),
            source=f"synthetic:seed={seed}:index={i}",
            ref_codes=None if ref_codes is None else ref_codes.astype(np.int16),
            ref_text=ref_text,
        )


def write_synthetic_corpus(out_dir: str | Path, num_samples: int, seed: int = 0, samples_per_shard: int = 64) -> Path:
    """Write the synthetic corpus as a shard set; returns the manifest path.

    A complete set of the same size in `out_dir` is reused (reruns start instantly); any other is replaced.
    """
    import json

    from moss.data.schema import MANIFEST

    manifest = Path(out_dir) / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("samples") == num_samples:
        return manifest
    for stale in Path(out_dir).glob("synthetic-*.tar"):
        stale.unlink()
    return write_shards(generate_samples(num_samples, seed), out_dir, prefix="synthetic", max_samples=samples_per_shard)
