"""A local page to type a dialogue, give each speaker a voice, and hear one or two checkpoints side by side.

Usage: python app.py checkpoint=runs/x/export [compare=/path/to/MOSS-TTSD-v0.5] codec.config=... codec.checkpoint=...
       [asr_model=... speaker_model=...] [port=7860]
Two adapter folders over the same base are loaded as one base with both adapters, switched per request without
merging. Every setting of conf/infer.yaml applies (codec, release, sampling, seed, engine, the input bounds).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from infer import load_checkpoint
from moss.audio import FRAME_RATE
from moss.cli import command, fail, require, run, stop_signals_interrupt
from moss.codec import codec_problems, load_codec
from moss.evaluation import load_judges
from moss.generation import generation_for
from moss.model.checkpoint import HUB_ID, load_tokenizer, read_adapter_config, resolve_model_path
from moss.studio import Studio, Voice, serve

log = logging.getLogger("app")


def build_studio(cfg: DictConfig) -> Studio:
    """The models, codec and metric models of `cfg`, loaded once, behind a `Studio`."""
    _check(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    voices, tokenizer = _voices(cfg, device)
    first = voices[0].model
    generation = generation_for(
        first.generation_config,
        OmegaConf.to_container(cfg.sampling) if cfg.sampling is not None else None,
        int(cfg.max_seconds * FRAME_RATE) if cfg.max_seconds else None,
        cfg.seed,
    )
    judges = load_judges(cfg.asr_model, cfg.speaker_model, device, cfg.asr_language)
    return Studio(
        voices,
        tokenizer,
        load_codec(cfg.codec, device=device),
        generation,
        cfg.normalize,
        judges,
        max_text_chars=cfg.max_text_chars,
        max_prompt_seconds=cfg.max_prompt_seconds,
        max_rows=cfg.max_rows or first.config.backbone.get("max_position_embeddings"),
        engine=cfg.engine,
    )


def _check(cfg: DictConfig) -> None:
    problems = require(cfg, {"checkpoint": "runs/<name>/export"})
    for key in ("checkpoint", "compare"):
        value = None if OmegaConf.is_missing(cfg, key) else cfg.get(key)
        if value is not None and not Path(str(value)).exists() and not HUB_ID.match(str(value)):
            problems.append(f"{key}={value} does not exist; give a model folder, an adapter folder or a run's .ckpt")
    if not isinstance(cfg.port, int) or not 0 <= cfg.port <= 65535:
        problems.append(f"port={cfg.port} must be a port number (0: any free port)")
    fail("invalid studio command", problems + codec_problems(cfg.codec))


def _voices(cfg: DictConfig, device: str) -> tuple[list[Voice], object]:
    paths = [str(cfg.checkpoint)] + ([str(cfg.compare)] if cfg.compare else [])
    labels = _labels(paths)
    bases = [_adapter_base(cfg, p) for p in paths]
    if len(paths) == 2 and bases[0] and bases[0] == bases[1]:  # two adapters over one base: switched, not merged
        from peft import PeftModel

        from moss.model import MossTTSD

        base = MossTTSD.from_pretrained(bases[0], dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
        peft = PeftModel.from_pretrained(base.to(device), paths[0], adapter_name="first")
        peft.load_adapter(paths[1], adapter_name="second")
        peft.eval()
        inner = peft.get_base_model()
        voices = [Voice(labels[0], inner, "first", peft), Voice(labels[1], inner, "second", peft)]
        return voices, load_tokenizer(cfg.tokenizer or bases[0])
    voices, tokenizer = [], None
    for label, path in zip(labels, paths, strict=True):
        one = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(one):
            one.checkpoint = path
        model, tok = load_checkpoint(one, device)
        voices.append(Voice(label, model))
        tokenizer = tokenizer or tok
    return voices, tokenizer


def _adapter_base(cfg: DictConfig, path: str) -> str | None:
    """The base model folder of an adapter folder (None for anything else)."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    base = cfg.base_model or read_adapter_config(Path(path)).get("base_model_name_or_path")
    return str(Path(resolve_model_path(base)).resolve()) if base else None


def _labels(paths: list[str]) -> list[str]:
    """Short distinct names: the last two parts of each path (`lora_v05/export`)."""
    labels = ["/".join(Path(p).parts[-2:]) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({n})" for n, label in enumerate(labels, start=1)]
    return labels


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point: serve until Ctrl-C or SIGTERM."""
    studio = build_studio(cfg)
    server = serve(studio, cfg.host, cfg.port)
    print(f"studio: http://{cfg.host}:{server.server_port}/ ({' vs '.join(studio.labels)}; Ctrl-C stops)", flush=True)
    try:
        with stop_signals_interrupt():
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        studio.close()


if __name__ == "__main__":
    run(main, Path(__file__).parent / "conf", "app")
