"""Is the fine-tune any good: intelligibility, voice similarity per turn, speaker switching, length.

`metrics` (the arithmetic), `turns` (where each turn lies in the audio), `speech_models` (the ASR and speaker
models), `scoring` (a checkpoint's `eval.json` section); `evaluate.py` runs it for one checkpoint or two.
"""

from moss.evaluation.scoring import Dialogue, score_dialogues
from moss.evaluation.speech_models import Transcriber, VoiceEmbedder, load_judges

__all__ = ["Dialogue", "Transcriber", "VoiceEmbedder", "load_judges", "score_dialogues"]
