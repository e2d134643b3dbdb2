"""A small byte-level BPE tokenizer with the real MOSS-TTSD special tokens, for the tiny default and tests.

It mirrors the channel-0 id *layout* of the real vocabulary at a small scale (the layout of the golden
stand-in tokenizer, 1416 ids): BPE text tokens 0..367, `<|endoftext|>` 368 (pad/eos), reserved 369..383,
codebook-0 placeholders 384..1407 (speech offset 384), the 8 control tokens 1408..1415
(`<|end_of_speech|>` = 1413). It is trained at run time from a fixed text, so no file is downloaded.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from moss.text.prompt import CONTROL_TOKENS, SYSTEM_PROMPT

TEXT_VOCAB = 368
PAD_TOKEN = "<|endoftext|>"
SPEECH_OFFSET = 384
# The words of the built-in synthetic corpus (moss/data/synthetic.py): the tokenizer is trained on them.
TINY_WORDS = (
    "hello there how are you today fine thanks what about the weather sunny rain cold warm "
    "coffee tea morning evening music play stop yes no maybe"
).split()
# The public Qwen2 pre-tokenisation regex (split contractions, letters, digits, punctuation, spaces).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tiny_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer on `corpus` (default: the system prompt and the tiny corpus vocabulary)."""
    texts = list(corpus) if corpus else [SYSTEM_PROMPT] * 3 + [" ".join(TINY_WORDS)] * 3 + ["[S1] [S2] , . ! ?"] * 3
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    vocab = bpe.get_vocab()
    ordered = sorted(vocab, key=vocab.get)
    ordered += [f"<|reserved_text_{i}|>" for i in range(TEXT_VOCAB - len(ordered))]
    ordered += [PAD_TOKEN] + [f"<|reserved_special_{i}|>" for i in range(SPEECH_OFFSET - TEXT_VOCAB - 1)]
    ordered += [f"<|speech_{c}|>" for c in range(1024)] + list(CONTROL_TOKENS)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(bpe)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(ordered)}, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD_TOKEN, *CONTROL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=PAD_TOKEN, pad_token=PAD_TOKEN)


def _merges(bpe: Tokenizer) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]
