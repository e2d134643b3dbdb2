"""A local page to listen to and compare checkpoints (`app.py`): `Studio` answers, `serve` puts it on HTTP."""

from moss.studio.server import Studio, Voice, serve

__all__ = ["Studio", "Voice", "serve"]
