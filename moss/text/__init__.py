"""Text side of MOSS-TTSD: normalisation and the prompt template."""

from moss.text.normalize import normalize_text
from moss.text.prompt import SYSTEM_PROMPT, PromptBuilder, map_speaker_tags

__all__ = ["SYSTEM_PROMPT", "PromptBuilder", "map_speaker_tags", "normalize_text"]
