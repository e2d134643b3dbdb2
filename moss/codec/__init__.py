"""XY-Tokenizer, the MOSS-TTSD speech codec: 16 kHz audio <-> 8 x 1024 codes at 12.5 frames/s."""

from moss.codec.checkpoint import codec_problems
from moss.codec.config import XYTokenizerConfig
from moss.codec.model import XYTokenizer, load_codec

__all__ = ["XYTokenizer", "XYTokenizerConfig", "codec_problems", "load_codec"]
