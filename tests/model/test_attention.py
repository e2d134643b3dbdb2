"""Every attention implementation available on this machine gives the same logits."""

import importlib.util

import pytest
import torch

from moss.model import MossTTSD
from tests.conftest import random_batch


def _flex_runs_here() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "attn",
    [
        "sdpa",
        pytest.param(
            "flex_attention", marks=pytest.mark.skipif(not _flex_runs_here(), reason="flex_attention not in this torch")
        ),
    ],
)
def test_attention_implementations_agree_with_eager(tiny_config, tmp_path, attn):
    MossTTSD.from_config(tiny_config, seed=1).save_pretrained(tmp_path)
    ids, _ = random_batch(tiny_config, batch=2, length=16)
    outs = {}
    for name in ("eager", attn):
        model = MossTTSD.from_pretrained(tmp_path, attn_implementation=name).eval()
        assert model.attn_implementation == name
        with torch.no_grad():
            outs[name] = model(ids, output_logits=True).logits
    for a, b in zip(outs["eager"], outs[attn], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_needs_the_package():
    from moss.model.attention import check_attn_implementation

    with pytest.raises(ValueError, match="needs the flash-attn package"):
        check_attn_implementation("flash_attention_2")
