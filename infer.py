"""Turn dialogue scripts into audio (see conf/infer.yaml).

Usage: python infer.py checkpoint=... codec.config=... codec.checkpoint=... input=dialogues.jsonl output_dir=out/
(or text='[S1]Hello![S2]Hi.' for one script).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import soundfile as sf
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from moss.audio import FRAME_RATE
from moss.cli import check_override_keys, command, fail, quote_values, require
from moss.codec import codec_problems, load_codec
from moss.generation import generation_for
from moss.inference import DECODERS, Item, ItemError, Result, Synthesizer, parse_item, read_items
from moss.model.checkpoint import HUB_ID, load_model
from moss.text.normalize import normalize_text, normalizer

log = logging.getLogger("infer")


def infer(cfg: DictConfig) -> list[Result]:
    """Synthesise every item of `cfg.input` (or `cfg.text`); returns one Result per item, in input order."""
    check_arguments(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load(cfg, device)
    codec = load_codec(cfg.codec, device=device)
    generation = generation_for(
        model.generation_config,
        OmegaConf.to_container(cfg.sampling) if cfg.sampling is not None else None,
        int(cfg.max_seconds * FRAME_RATE) if cfg.max_seconds else None,
        cfg.seed,
    )
    log.info("generation: %s", generation)
    synth = Synthesizer(
        model, tokenizer, codec, generation, normalizer(cfg.normalize), cfg.system_prompt, cfg.batch_size, cfg.decode
    )
    writer = AudioWriter(Path(cfg.output_dir), cfg.format, cfg.subtype, codec.output_sample_rate, cfg.normalize)
    items, results = _parse_items(cfg)
    bar = tqdm(total=len(items), unit="item", disable=not cfg.progress)
    size = 1 if cfg.streaming else cfg.batch_size
    try:
        for start in range(0, len(items), size):
            group = items[start : start + size]
            for res in _synthesize(group, synth, writer, cfg.streaming):
                results[res.index] = res
            bar.update(len(group))
    finally:  # results.jsonl is written whatever happens, with the items not reached marked as such
        bar.close()
        for item in items:
            results.setdefault(item.index, Result(item.index, item.text, error="not synthesised: the run stopped"))
        ordered = [results[i] for i in sorted(results)]
        writer.write_results(ordered)
    done = [r for r in ordered if r.error is None]
    summary = (
        f"wrote {len(done)} of {len(ordered)} items to {writer.out_dir} "
        f"({sum(r.duration_s for r in done):.1f} s of audio)"
    )
    summary += "".join(f"\n  item {r.index}: {r.error}" for r in ordered if r.error)
    print(summary.encode("utf-8", "backslashreplace").decode("utf-8"))
    return ordered


def _load(cfg: DictConfig, device: str):
    """The model and tokenizer of `cfg.checkpoint`: a model folder (no Lightning), or a run's `.ckpt`."""
    if Path(cfg.checkpoint).suffix == ".ckpt":  # a training run's checkpoint: the training layer reads it
        from moss.training.run_checkpoint import model_from_checkpoint

        return model_from_checkpoint(cfg.checkpoint, cfg.tokenizer, device, cfg.attn_implementation)
    return load_model(
        cfg.checkpoint,
        base_model=cfg.base_model,
        tokenizer=cfg.tokenizer,
        device=device,
        dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation,
    )


def _parse_items(cfg: DictConfig) -> tuple[list[Item], dict[int, Result]]:
    """The valid items of the input, and a Result with its error for each rejected line."""
    raw = read_items(cfg.input) if cfg.input else [{"text": cfg.text}]
    base = cfg.base_path or (str(Path(cfg.input).parent) if cfg.input else None)
    items, rejected = [], {}
    for index, data in enumerate(raw):
        try:
            if isinstance(data, Exception):
                raise data
            items.append(parse_item(data, index, base, cfg.silence_seconds))
        except Exception as err:  # noqa: BLE001 - one bad item is reported; the others are still produced
            reason = str(err) if isinstance(err, ItemError) else f"{type(err).__name__}: {err}"
            rejected[index] = Result(index, _text_of(data), error=reason)
            log.warning("item %d skipped: %s", index, reason)
    return items, rejected


def _synthesize(group: list[Item], synth: Synthesizer, writer: AudioWriter, streaming: bool) -> list[Result]:
    """A batch, or, when it fails, each of its items alone: one failing item costs only itself."""
    try:
        return [writer.stream(group[0], synth)] if streaming else synth.synthesize(group, writer.write)
    except Exception as err:  # noqa: BLE001 - reported per item below
        if len(group) > 1:
            log.warning("a batch of %d items failed (%s); synthesising them one by one", len(group), err)
            return [res for item in group for res in _synthesize([item], synth, writer, streaming)]
        log.warning("item %d failed: %s", group[0].index, err)
        return [Result(group[0].index, group[0].text, error=f"synthesis failed ({type(err).__name__}: {err})")]


class AudioWriter:
    """Writes each item's audio (`output_NNNN.<format>`) and the run's `results.jsonl` into `out_dir`."""

    def __init__(self, out_dir: Path, fmt: str, subtype: str | None, sample_rate: int, normalize: str | None):
        self.out_dir, self.format, self.subtype = out_dir, fmt, subtype
        self.sample_rate, self.normalize = sample_rate, normalize
        out_dir.mkdir(parents=True, exist_ok=True)

    def path(self, item: Item) -> Path:
        return self.out_dir / f"output_{item.index:04d}.{self.format}"

    def result(self, item: Item, samples: int, first: float | None = None) -> Result:
        """The item's Result; no audio at all is an error (the model ended at once), and no file is left."""
        if samples == 0:
            self.path(item).unlink(missing_ok=True)
            return Result(item.index, item.text, error="generated no audio (the model ended at once)")
        text = normalize_text(item.text, self.normalize) if self.normalize else item.text
        return Result(
            item.index, item.text, text, str(self.path(item)), samples / self.sample_rate, first_audio_s=first
        )

    def write(self, item: Item, wave: torch.Tensor) -> Result:
        sf.write(self.path(item), wave.float().cpu().numpy(), self.sample_rate, subtype=self.subtype)
        return self.result(item, wave.numel())

    def stream(self, item: Item, synth: Synthesizer) -> Result:
        """Synthesise one item, writing its audio window by window as the decoder produces it."""
        samples = 0
        with sf.SoundFile(self.path(item), "w", self.sample_rate, 1, subtype=self.subtype) as f:

            def on_chunk(wave: torch.Tensor) -> None:
                nonlocal samples
                f.write(wave.float().cpu().numpy())
                samples += wave.numel()

            first = synth.stream(item, on_chunk)
        return self.result(item, samples, first)

    def write_results(self, results: list[Result]) -> None:
        """`results.jsonl`, one line per item in input order; U+2028/2029 escaped so every reader splits lines alike."""
        with open(self.out_dir / "results.jsonl", "wb") as f:
            for res in results:
                line = json.dumps({k: v for k, v in vars(res).items() if v is not None}, ensure_ascii=False)
                line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
                f.write(line.encode("utf-8", "backslashreplace") + b"\n")


CHOICES = {
    "format": ("wav", "flac"),
    "normalize": ("v0.5", "v0.7", None),
    "dtype": ("float32", "bfloat16"),
    "decode": DECODERS,
}


def check_arguments(cfg: DictConfig) -> None:
    """Every problem of the command at once, each with its fix, before any model or codec is loaded."""
    problems = require(cfg, {"checkpoint": "runs/<name>/export", "output_dir": "out/"})
    if (cfg.input is None) == (cfg.text is None):
        problems.append("give exactly one of input=dialogues.jsonl or \"text='[S1]...[S2]...'\" (quoted)")
    elif cfg.input is not None and not Path(str(cfg.input)).is_file():
        problems.append(f"input={cfg.input} is not a file; set input=/path/to/dialogues.jsonl")
    if not OmegaConf.is_missing(cfg, "checkpoint") and cfg.checkpoint is not None:
        path = Path(str(cfg.checkpoint))
        if not (path.is_dir() or (path.is_file() and path.suffix == ".ckpt") or HUB_ID.match(str(path))):
            problems.append(
                f"checkpoint={path} does not exist; give an HF-format folder (runs/<name>/export), a LoRA adapter "
                f"folder (runs/<name>/adapter) or a run's .ckpt"
            )
    problems += codec_problems(cfg.codec)
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            problems.append(f"{key}={cfg[key]} is not one of {list(allowed)}")
    if cfg.device not in ("auto", "cpu") and str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device={cfg.device} but this machine has no CUDA GPU; use device=cpu (or device=auto)")
    if cfg.streaming and cfg.decode == "prompt_augmented":
        problems.append(
            "streaming=true decodes 30 s windows as rows arrive; decode=prompt_augmented needs the whole output: "
            "use decode=windows with streaming, or streaming=false"
        )
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        problems.append(f"batch_size={cfg.batch_size} must be a positive integer")
    fail("invalid inference command", problems)


def _text_of(data) -> str:
    """The text of a rejected item, for its report line (whatever type it had)."""
    text = data.get("text") if isinstance(data, dict) else None
    return text if isinstance(text, str) else ""


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    infer(cfg)


if __name__ == "__main__":
    sys.argv = quote_values(sys.argv, ("text", "system_prompt"))  # text='[S1]...' works as the shell passes it
    check_override_keys(Path(__file__).parent / "conf", "infer", sys.argv)
    main()
