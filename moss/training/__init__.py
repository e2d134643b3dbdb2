"""The Lightning training system: module, callbacks, schedule, export."""

from moss.training.lit_module import MossTTSDLitModule

__all__ = ["MossTTSDLitModule"]
