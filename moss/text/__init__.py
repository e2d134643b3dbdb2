"""Text side of MOSS-TTSD: the prompt template (and text normalisation)."""

from moss.text.prompt import SYSTEM_PROMPT, PromptBuilder, map_speaker_tags

__all__ = ["SYSTEM_PROMPT", "PromptBuilder", "map_speaker_tags"]
