"""Turn dialogue scripts into audio (see conf/infer.yaml).

Usage: python infer.py checkpoint=... codec.config=... codec.checkpoint=... input=dialogues.jsonl output_dir=out/
(or text='[S1]Hello![S2]Hi.' for one script).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import soundfile as sf
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from moss.codec import XYTokenizer
from moss.generation import sampling_config
from moss.inference import Item, ItemError, Result, Synthesizer, load_model, parse_item, read_items
from moss.text.normalize import normalize_text, normalizer

log = logging.getLogger("infer")


def infer(cfg: DictConfig) -> list[Result]:
    """Synthesise every item of `cfg.input` (or `cfg.text`); returns one Result per item, in input order."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(
        cfg.checkpoint,
        base_model=cfg.base_model,
        tokenizer=cfg.tokenizer,
        device=device,
        dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation,
    )
    codec = XYTokenizer.from_pretrained(cfg.codec.config, cfg.codec.checkpoint, device=device)
    generation = sampling_config(OmegaConf.to_container(cfg.sampling), int(cfg.max_seconds * 12.5), cfg.seed)
    synth = Synthesizer(
        model, tokenizer, codec, generation, normalizer(cfg.normalize), cfg.system_prompt, cfg.batch_size
    )
    if (cfg.input is None) == (cfg.text is None):
        raise ValueError("give exactly one of input=dialogues.jsonl or text='[S1]...'")
    raw = read_items(cfg.input) if cfg.input else [{"text": cfg.text}]
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.base_path or (str(Path(cfg.input).parent) if cfg.input else None)
    results: dict[int, Result] = {}
    items: list[Item] = []
    for index, data in enumerate(raw):
        try:
            if isinstance(data, Exception):
                raise data
            items.append(parse_item(data, index, base, cfg.silence_seconds))
        except ItemError as err:
            results[index] = Result(index, str(data.get("text")) if isinstance(data, dict) else "", error=str(err))
            log.warning("item %d skipped: %s", index, err)

    def path_of(item: Item) -> Path:
        return out_dir / f"output_{item.index:04d}.{cfg.format}"

    def result(item: Item, samples: int, first: float | None = None) -> Result:
        text = normalize_text(item.text, cfg.normalize) if cfg.normalize else item.text
        return Result(
            item.index, item.text, text, str(path_of(item)), samples / codec.output_sample_rate, first_audio_s=first
        )

    def write(item: Item, wave: torch.Tensor) -> Result:
        sf.write(path_of(item), wave.float().cpu().numpy(), codec.output_sample_rate, subtype=cfg.subtype)
        return result(item, wave.numel())

    bar = tqdm(total=len(items), unit="item", disable=not cfg.progress)
    if cfg.streaming:
        for item in items:
            with sf.SoundFile(path_of(item), "w", codec.output_sample_rate, 1, subtype=cfg.subtype) as f:
                count = [0]

                def on_chunk(wave, f=f, count=count):
                    f.write(wave.float().cpu().numpy())
                    count[0] += wave.numel()

                first = synth.stream(item, on_chunk)
            results[item.index] = result(item, count[0], first)
            bar.update(1)
    else:
        for start in range(0, len(items), cfg.batch_size):
            group = items[start : start + cfg.batch_size]
            for res in synth.synthesize(group, write):
                results[res.index] = res
            bar.update(len(group))
    bar.close()
    ordered = [results[i] for i in sorted(results)]
    with open(out_dir / "results.jsonl", "w") as f:
        for res in ordered:
            f.write(json.dumps({k: v for k, v in vars(res).items() if v is not None}, ensure_ascii=False) + "\n")
    done = [r for r in ordered if r.error is None]
    print(
        f"wrote {len(done)} of {len(ordered)} items to {out_dir} ({sum(r.duration_s for r in done):.1f} s of audio)"
        + "".join(f"\n  item {r.index}: {r.error}" for r in ordered if r.error)
    )
    return ordered


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    infer(cfg)


if __name__ == "__main__":
    main()
