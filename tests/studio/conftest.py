"""Tiny checkpoints for the studio: two model folders, and two LoRA adapters over one base."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch


@pytest.fixture(scope="session")
def studio_models(tmp_path_factory) -> Path:
    from moss.model import MossTTSD, MossTTSDConfig
    from moss.model.lora import apply_lora
    from moss.text.tiny_tokenizer import build_tiny_tokenizer
    from moss.training.export import save_adapter

    root = tmp_path_factory.mktemp("studio")
    tokenizer = build_tiny_tokenizer()
    for name, seed in (("tuned", 1), ("base", 0)):
        MossTTSD.from_config(MossTTSDConfig.tiny(), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for name, seed in (("adapter_a", 5), ("adapter_b", 6)):
        adapted = apply_lora(MossTTSD.from_pretrained(root / "tuned"), r=4)
        torch.manual_seed(seed)
        for key, parameter in adapted.named_parameters():
            if "lora_B" in key:
                torch.nn.init.normal_(parameter, std=0.2)
        save_adapter(adapted, root / name)
        config = json.loads((root / name / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(root / "tuned")
        (root / name / "adapter_config.json").write_text(json.dumps(config))
    return root


def wav_base64(seconds: float, seed: int = 0, rate: int = 16000) -> str:
    import base64

    buffer = io.BytesIO()
    wave = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate)).astype(np.float32)
    sf.write(buffer, wave, rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()
