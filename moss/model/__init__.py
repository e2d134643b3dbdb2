"""The MOSS-TTSD model in plain PyTorch + transformers (no Lightning, no Hydra)."""

from moss.model.attention import ATTN_IMPLEMENTATIONS
from moss.model.backbone import MossTTSDOutput
from moss.model.config import ConfigError, MossTTSDConfig
from moss.model.modeling import MossTTSD

__all__ = ["ATTN_IMPLEMENTATIONS", "ConfigError", "MossTTSD", "MossTTSDConfig", "MossTTSDOutput"]
