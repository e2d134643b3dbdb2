"""Turn dialogue scripts into audio (see conf/infer.yaml).

Usage: python infer.py checkpoint=... codec.config=... codec.checkpoint=... input=dialogues.jsonl output_dir=out/
(or text='[S1]Hello![S2]Hi.' for one script).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import soundfile as sf
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from moss.audio import FRAME_RATE
from moss.cli import command, fail, require, run, stop_signals_interrupt
from moss.codec import codec_problems, load_codec
from moss.generation import generation_for
from moss.inference import DECODERS, Item, ItemError, Result, Synthesizer, parse_item, read_items
from moss.model.checkpoint import HUB_ID, load_model
from moss.outputs import OutputFolder, refused_errno
from moss.text.normalize import normalize_text, normalizer

log = logging.getLogger("infer")
RESULTS = "results.jsonl"
NO_AUDIO = "generated no audio (the model ended at once)"


def infer(cfg: DictConfig) -> list[Result]:
    """Synthesise every item of `cfg.input` (or `cfg.text`); returns one Result per item, in input order.

    `results.jsonl` gets a line as each item ends (flushed: a kill loses at most the items in flight) and is
    rewritten in input order at the end, also when SIGTERM, SIGUSR1 or Ctrl-C stops the run after the item in
    progress. An earlier run's list is replaced at the start (with `overwrite=true`), so no line ever describes
    a file of another run.
    """
    folder = check_arguments(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    items, results = parse_items(cfg)
    model, tokenizer = load_checkpoint(cfg, device)
    codec = load_codec(cfg.codec, device=device)
    generation = generation_for(
        model.generation_config,
        OmegaConf.to_container(cfg.sampling) if cfg.sampling is not None else None,
        int(cfg.max_seconds * FRAME_RATE) if cfg.max_seconds else None,
        cfg.seed,
    )
    log.info("generation: %s", generation)
    synth = Synthesizer(
        model,
        tokenizer,
        codec,
        generation,
        normalizer(cfg.normalize),
        cfg.system_prompt,
        cfg.batch_size,
        cfg.decode,
        cfg.engine,
        cfg.check_every,
    )
    items = _within_limits(items, results, synth, cfg.max_rows or model.config.backbone.get("max_position_embeddings"))
    writer = AudioWriter(folder, cfg.format, cfg.subtype, codec.output_sample_rate, cfg.normalize)
    for res in results.values():
        writer.append(res)
    bar = tqdm(total=len(items), unit="item", disable=not cfg.progress)
    size = 1 if cfg.streaming else cfg.batch_size
    try:
        with stop_signals_interrupt():
            for start in range(0, len(items), size):
                group = items[start : start + size]
                for res in _synthesize(group, synth, writer, cfg.streaming):
                    results[res.index] = res
                    writer.append(res)
                bar.update(len(group))
    finally:  # results.jsonl is completed whatever happens, with the items not reached marked as such
        bar.close()
        for item in items:
            results.setdefault(item.index, Result(item.index, item.text, error="not synthesised: the run stopped"))
        ordered = [results[i] for i in sorted(results)]
        writer.finish(ordered)
    done = [r for r in ordered if r.error is None]
    summary = (
        f"wrote {len(done)} of {len(ordered)} items to {writer.out_dir} "
        f"({sum(r.duration_s for r in done):.1f} s of audio)"
    )
    summary += "".join(f"\n  item {r.index}: {r.error}" for r in ordered if r.error)
    print(summary.encode("utf-8", "backslashreplace").decode("utf-8"))
    return ordered


def _within_limits(items: list[Item], results: dict[int, Result], synth: Synthesizer, max_rows: int | None):
    """The items whose prompt and generation fit `max_rows`; the others get their Result with the reason."""
    if not max_rows:
        return items
    kept = []
    for item in items:
        if reason := synth.too_long(item, int(max_rows)):
            results[item.index] = Result(item.index, item.text, error=reason)
            log.warning("item %d skipped: %s", item.index, reason)
        else:
            kept.append(item)
    return kept


def load_checkpoint(cfg: DictConfig, device: str):
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


def parse_items(cfg: DictConfig) -> tuple[list[Item], dict[int, Result]]:
    """The valid items of the input, and a Result with its error for each rejected line."""
    raw = read_items(cfg.input) if cfg.input else [{"text": cfg.text}]
    base = cfg.base_path or (str(Path(cfg.input).parent) if cfg.input else None)
    items, rejected = [], {}
    for index, data in enumerate(raw):
        try:
            if isinstance(data, Exception):
                raise data
            items.append(parse_item(data, index, base, cfg.silence_seconds, cfg.max_prompt_seconds))
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
        if refused_errno(err) is not None:
            raise  # a full or read-only disk: every item would fail the same way; one error line, work kept
        if len(group) > 1:
            log.warning("a batch of %d items failed (%s); synthesising them one by one", len(group), err)
            return [res for item in group for res in _synthesize([item], synth, writer, streaming)]
        log.warning("item %d failed: %s", group[0].index, err)
        return [Result(group[0].index, group[0].text, error=f"synthesis failed ({type(err).__name__}: {err})")]


class _NoAudio(Exception):
    """The model ended at once: nothing to put in place."""


class AudioWriter:
    """Writes each item's audio (`output_NNNN.<format>`) and the run's `results.jsonl` into an OutputFolder."""

    def __init__(self, folder: OutputFolder, fmt: str, subtype: str | None, sample_rate: int, normalize: str | None):
        self.folder, self.out_dir, self.format, self.subtype = folder, folder.path, fmt, subtype
        self.sample_rate, self.normalize = sample_rate, normalize
        folder.put_text(RESULTS, "")  # a fresh list before any file of this run is in place

    def name(self, item: Item) -> str:
        return f"output_{item.index:04d}.{self.format}"

    def path(self, item: Item) -> Path:
        return self.out_dir / self.name(item)

    def result(self, item: Item, samples: int, first: float | None = None) -> Result:
        """The item's Result; no audio at all is an error (the model ended at once), and no file of it is placed."""
        if samples == 0:
            return Result(item.index, item.text, error=NO_AUDIO)
        text = normalize_text(item.text, self.normalize) if self.normalize else item.text
        return Result(
            item.index, item.text, text, str(self.path(item)), samples / self.sample_rate, first_audio_s=first
        )

    def _sound_file(self, tmp: Path):
        return sf.SoundFile(tmp, "w", self.sample_rate, 1, subtype=self.subtype, format=self.format.upper())

    def write(self, item: Item, wave: torch.Tensor) -> Result:
        if wave.numel() == 0:
            return self.result(item, 0)

        def write(tmp: Path) -> None:
            with self._sound_file(tmp) as f:
                f.write(wave.float().cpu().numpy())

        self.folder.put(self.name(item), write)
        return self.result(item, wave.numel())

    def stream(self, item: Item, synth: Synthesizer) -> Result:
        """Synthesise one item, writing its audio window by window as the decoder produces it."""
        samples, first = 0, None

        def write(tmp: Path) -> None:
            nonlocal samples, first
            with self._sound_file(tmp) as f:

                def on_chunk(wave: torch.Tensor) -> None:
                    nonlocal samples
                    f.write(wave.float().cpu().numpy())
                    samples += wave.numel()

                first = synth.stream(item, on_chunk)
            if samples == 0:
                raise _NoAudio

        try:
            self.folder.put(self.name(item), write)
        except _NoAudio:
            pass
        return self.result(item, samples, first)

    def append(self, res: Result) -> None:
        """One line for `res`, flushed to disk before the next item starts."""
        with open(self.out_dir / RESULTS, "ab") as f:
            f.write(_result_line(res))
            f.flush()
            os.fsync(f.fileno())

    def finish(self, results: list[Result]) -> None:
        """`results.jsonl` in input order, atomically (the earlier run's files were removed at the start)."""
        self.folder.put(RESULTS, lambda tmp: tmp.write_bytes(b"".join(_result_line(r) for r in results)))


def _result_line(res: Result) -> bytes:
    """One JSON line; U+2028/2029 escaped so every reader splits lines alike."""
    line = json.dumps({k: v for k, v in vars(res).items() if v is not None}, ensure_ascii=False)
    line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return line.encode("utf-8", "backslashreplace") + b"\n"


CHOICES = {
    "format": ("wav", "flac"),
    "normalize": ("v0.5", "v0.7", None),
    "dtype": ("float32", "bfloat16"),
    "decode": DECODERS,
}


def check_arguments(cfg: DictConfig) -> OutputFolder:
    """Every problem of the command at once, each with its fix, before any model or codec is loaded.

    Returns the output folder, checked: someone else's files, or an earlier run without `overwrite=true`, are
    refused (it is created by the first file written).
    """
    problems = require(cfg, {"checkpoint": "runs/<name>/export", "output_dir": "out/"})
    folder = None
    if not OmegaConf.is_missing(cfg, "output_dir") and cfg.output_dir is not None:
        folder = OutputFolder(cfg.output_dir, "infer", overwrite=cfg.overwrite)
        problems += folder.problems()
    if (cfg.input is None) == (cfg.text is None):
        problems.append("give exactly one of input=dialogues.jsonl or \"text='[S1]...[S2]...'\" (quoted)")
    elif cfg.input is not None and not Path(str(cfg.input)).is_file():
        problems.append(f"input={cfg.input} is not a file; set input=/path/to/dialogues.jsonl")
    if not OmegaConf.is_missing(cfg, "checkpoint") and cfg.checkpoint is not None:
        path = Path(str(cfg.checkpoint))
        if path.suffix == ".ckpt" and path.is_dir():
            problems.append(
                f"checkpoint={path} is a folder, but a .ckpt names a run's checkpoint file; give the file "
                f"(runs/<name>/checkpoints/last.ckpt) or an exported model folder"
            )
        elif path.is_file() and path.suffix != ".ckpt":
            problems.append(
                f"checkpoint={path} is a file; give the model folder that holds it (runs/<name>/export), an "
                f"adapter folder, or a run's .ckpt"
            )
        elif not (path.is_dir() or (path.is_file() and path.suffix == ".ckpt") or HUB_ID.match(str(path))):
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
    return folder.check()


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
    run(main, Path(__file__).parent / "conf", "infer", free_text=("text", "system_prompt"))
