"""Is the fine-tune any good: intelligibility, voice similarity per turn, speaker switching, length.

`metrics` (the arithmetic), `turns` (where each turn lies in the audio), `judges` (the ASR and speaker models),
`scoring` (a checkpoint's `eval.json` section); `evaluate.py` runs it for one checkpoint or two.
"""

from moss.evaluation.judges import Transcriber, VoiceEmbedder, load_judges
from moss.evaluation.scoring import Dialogue, score_dialogues

__all__ = ["Dialogue", "Transcriber", "VoiceEmbedder", "load_judges", "score_dialogues"]
