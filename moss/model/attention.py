"""The attention implementations a MossTTSD can run, checked by name before a model is built.

transformers' own (`sdpa`, `eager`, `flex_attention`, `flash_attention_2`) and this project's packed
`varlen_sdpa` (`moss.model.varlen`, registered with transformers when imported here).
"""

from __future__ import annotations

import importlib.util
from typing import Literal, get_args

from moss.model import varlen

AttnImplementation = Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "varlen_sdpa"]
ATTN_IMPLEMENTATIONS = get_args(AttnImplementation)
assert varlen.NAME in ATTN_IMPLEMENTATIONS


def check_attn_implementation(name: str) -> str:
    """Validate an attention implementation name, with the fix in the message."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; choose one of {ATTN_IMPLEMENTATIONS} "
            f"(e.g. model.attn_implementation=sdpa)"
        )
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (pip install 'moss-lightning[gpu]' "
            "on a CUDA machine); use model.attn_implementation=sdpa otherwise"
        )
    return name
