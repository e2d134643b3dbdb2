"""Fixtures for the pipelines: a tiny codec on disk and a folder of generated dialogue audio + JSONL."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import yaml
from safetensors.torch import save_file

from moss.codec import XYTokenizer, XYTokenizerConfig


def tone(seconds: float, rate: int = 16000, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (
        0.3 * np.sin(2 * math.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * math.pi * 2 * t))
        + 0.01 * rng.standard_normal(t.shape)
    ).astype(np.float32)


@pytest.fixture(scope="session")
def codec_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codec")
    config = XYTokenizerConfig.tiny()
    (folder / "codec.yaml").write_text(yaml.safe_dump({"generator_params": config.params}))
    model = XYTokenizer.from_config(config, seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "codec.safetensors"))
    return folder / "codec.yaml", folder / "codec.safetensors"


def write_good_corpus(folder, n: int = 8):
    """n valid records of both formats, wav and flac; returns the JSONL path."""
    audio = folder / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        ext = "flac" if i % 2 else "wav"
        sf.write(audio / f"d{i}.{ext}", tone(1.0 + 0.3 * i, freq=200 + 10 * i, seed=i), 16000)
        if i % 3 == 2:
            sf.write(audio / f"r{i}.wav", tone(0.8, freq=300, seed=100 + i), 16000)
            lines.append(
                {
                    "reference_audio": f"audio/r{i}.wav",
                    "reference_text": "[S1]reference words",
                    "audio": f"audio/d{i}.{ext}",
                    "text": f"[S2]dialogue number {i}",
                }
            )
        else:
            lines.append({"file_path": f"audio/d{i}.{ext}", "full_transcript": f"[S1]hello {i}[S2]world {i}"})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def pipeline_cfg(codec_files, inputs, output_dir, **overrides):
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    cfg = compose_config("preprocess", ["inputs=[]", "output_dir=x"])
    cfg.inputs, cfg.output_dir = [str(p) for p in inputs], str(output_dir)
    cfg.codec.config, cfg.codec.checkpoint = str(codec_files[0]), str(codec_files[1])
    cfg.devices, cfg.cpu_workers, cfg.progress, cfg.records_per_shard = "cpu", 0, False, 3
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg
