r"""Raw dialogue JSONL + audio -> WebDataset shards of XY-Tokenizer codes, in parallel and resumably.

    python -m data_pipelines.preprocess inputs=[train.jsonl] output_dir=shards/ \\
        codec.config=xy_tokenizer_32k_config.yaml codec.checkpoint=xy_tokenizer.ckpt

Work is split into *slots*: slot s owns records s, s + S, s + 2S, ... (S slots, fixed at the first run in
`plan.json`: `data_pipelines.journal`) and writes shards `{s:05d}-{k:06d}.tar`, shard k holding its records
k*R .. (k+1)*R - 1.
A shard is written to a temporary name and renamed, then its metadata `<shard>.json` (counts and skips) is
written the same way; a shard counts as done only when that file exists. So a rerun after a crash anywhere
redoes exactly the unfinished shards and the final set has the samples of an uninterrupted run.

Processes: every launched process (torchrun/SLURM ranks, times local devices) takes slots round-robin; on
one machine without a launcher, one process per GPU is spawned (or one CPU process). Each has a pool of CPU
workers that validate records and read, down-mix and resample audio, while it encodes length-sorted batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import resource
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import Field
from tqdm import tqdm

from data_pipelines.journal import Journal, file_digest, file_stamp
from data_pipelines.records import Limits, Loaded, Record, RecordIndex, Skip, load
from data_pipelines.to_store import Publisher, store_problems, work_folder
from data_pipelines.workers import WorkerFailure, WorkerPool
from moss.audio import FRAME_RATE
from moss.cli import command, fail, require, run, stop_signals_interrupt
from moss.codec.checkpoint import codec_problems
from moss.config_schema import check_mapping
from moss.data import storage
from moss.data.schema import SampleError, ShardSample
from moss.data.writer import write_manifest, write_shard
from moss.distributed import launcher_rank
from moss.errors import ConfigError
from moss.outputs import OutputFolder, atomic_write
from moss.settings import Count, Seconds, Size, TypedDict, Workers

log = logging.getLogger(__name__)
OmegaConf.register_new_resolver("moss_work_dir", work_folder, replace=True)  # hydra.run.dir of a remote output_dir


# ---------------------------------------------------------------------------------------------- planning
def local_devices(setting, local_rank: int | None) -> list[str]:
    """`auto`: one device per process under a launcher, else every local GPU, else the CPU."""
    if setting == "cpu" or not torch.cuda.is_available():
        return ["cpu"]
    if setting == "auto":
        if local_rank is not None:
            return [f"cuda:{local_rank}"]
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [f"cuda:{int(i)}" for i in setting]


def journal(cfg: DictConfig) -> Journal:
    """The output folder's journal; its shards are made from the inputs, the codec files, the shard size, the limits.

    The inputs count by content (SHA-256); a rerun made from anything else is refused (`stale_reason`).
    """
    codec = OmegaConf.to_container(cfg.codec, resolve=True)
    for key in ("config", "checkpoint"):  # the files themselves: a checkpoint replaced under the same name
        if isinstance(codec.get(key), str) and Path(codec[key]).is_file():
            codec[key] = file_stamp(codec[key])
    made = {
        "inputs": {file: file_digest(file) for file in resolve_inputs(list(cfg.inputs))},
        "records_per_shard": int(cfg.records_per_shard),
        "codec": codec,
        "limits": OmegaConf.to_container(cfg.limits, resolve=True),
        "base_path": cfg.get("base_path"),
    }
    if encoder_dtype(cfg) is not None:  # float32 leaves no key: shard sets made before the setting still resume
        made["codec_dtype"] = str(cfg.codec_dtype)
    return Journal(cfg.output_dir, made)


def resolve_inputs(inputs: list[str]) -> list[str]:
    """Absolute paths of the input JSONL files, each once."""
    resolved = []
    for given in inputs:
        file = Path(given).resolve()
        if not file.is_file():
            raise ConfigError(f"inputs: {given} is not a file; list JSONL files, e.g. inputs=[/data/train.jsonl]")
        if str(file) in resolved:
            log.warning("inputs lists %s twice; it is read once", given)
            continue
        resolved.append(str(file))
    return resolved


def encoder_dtype(cfg: DictConfig) -> torch.dtype | None:
    """The codec encoder's autocast dtype (`codec_dtype`); None for float32, the reference."""
    name = str(cfg.get("codec_dtype") or "float32")  # one of PreprocessSettings.codec_dtype, checked at start
    return None if name == "float32" else getattr(torch, name)


def stale_reason(cfg: DictConfig) -> str | None:
    """Why the shard set in `cfg.output_dir` cannot be continued with `cfg` (None: absent, or resumable)."""
    return "; ".join(journal(cfg).changes()) or None


def preprocess_config(inputs: list[str], output_dir: str | Path, codec, **settings) -> DictConfig:
    """conf/preprocess.yaml's settings for `inputs` -> `output_dir` with `codec` (for callers other than the CLI)."""
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "preprocess.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    cfg.codec = codec
    cfg.inputs, cfg.output_dir = [str(i) for i in inputs], str(output_dir)
    return OmegaConf.merge(cfg, settings)


def shard_name(slot: int, index: int) -> str:
    """`{slot:05d}-{index:06d}.tar`: the rank-style name of a slot's index-th shard."""
    return f"{slot:05d}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------- workers
def _init_loader() -> None:
    torch.set_num_threads(1)


def _load(args: tuple[Record, Limits]) -> Loaded | Skip:
    return load(*args)


class EncoderCrashes:
    """`<shard>.encoding`: the records being encoded, so an encoder crash is not repeated by every rerun.

    Such a crash is one of the encoder process itself (killed for memory, a fault in the codec), which no
    exception handler sees. After it, the rerun encodes the records of the interrupted batch one at a time;
    a record that kills the encoder twice on its own is reported instead of tried again.
    """

    def __init__(self, path: Path):
        self.path = path
        self.solo_crashes: dict[tuple[str, int], int] = {}
        try:
            saved = json.loads(path.read_text()) if path.is_file() else None
            records = [(str(s), int(n)) for s, n in saved["records"]] if saved else []
            if len(records) == 1:
                self.solo_crashes[records[0]] = int(saved.get("solo", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            records = []  # a record cut short by the crash: nothing to learn from it
        self.suspects = set(records)
        if records:
            log.warning(
                "%s: the encoder stopped while encoding %d records; encoding them one by one", path, len(records)
            )

    @staticmethod
    def key(record: Record) -> tuple[str, int]:
        return record.source, record.line

    def fatal(self, record: Record) -> bool:
        """True for a record that killed the encoder twice when encoded alone."""
        return self.solo_crashes.get(self.key(record), 0) >= 2

    def begin(self, records: list[Record]) -> None:
        solo = self.solo_crashes.get(self.key(records[0]), 0) + 1 if len(records) == 1 else 0
        text = json.dumps({"records": [self.key(r) for r in records], "solo": solo})
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


class ShardEncoder:
    """Encodes the records of shards: a crash-proof CPU pool loads audio, the codec encodes length-sorted batches.

    Memory: loaded audio waits only until its batch (`batch_seconds`) is encoded; then a record is its int16
    codes and text until the shard writer (streaming, in record order) has it. So a process holds at most one
    batch plus `2 x cpu_workers` loaded records, whatever `records_per_shard` is.
    """

    def __init__(self, cfg: DictConfig, device: str, workers: int):
        # Fork is cheap and safe while this process has not touched CUDA (the codec is loaded afterwards).
        ctx = mp.get_context("spawn" if torch.cuda.is_initialized() else "fork")
        self.pool = (
            WorkerPool(_load, workers, ctx, timeout=float(cfg.record_timeout), initializer=_init_loader)
            if workers > 0
            else None
        )
        from moss.codec import load_codec

        self.codec = load_codec(cfg.codec, device=device)
        self.cfg, self.limits = cfg, Limits(**cfg.limits)
        self.audio_seconds = 0.0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def _loaded(self, records: list[Record]) -> Iterator[tuple[int, Loaded | Skip]]:
        tasks = [(r, self.limits) for r in records]
        if self.pool is None:
            yield from enumerate(map(_load, tasks))
            return
        for i, result in self.pool.map_unordered(tasks):
            if isinstance(result, WorkerFailure):
                result = Skip(records[i], result.reason, stage="load")
            yield i, result

    def _sample(self, item: Loaded, main: torch.Tensor, ref: torch.Tensor | None) -> ShardSample | Skip:
        sample = ShardSample(
            key=item.record.key,
            codes=main.cpu().numpy().astype(np.int16),
            text=item.text,
            source=f"{item.record.source}:{item.record.line}",
            codec=self.cfg.codec.name,
            codec_sample_rate=self.codec.input_sample_rate,
            ref_codes=None if ref is None else ref.cpu().numpy().astype(np.int16),
            ref_text=item.ref_text,
        )
        try:
            sample.validate()  # the writer's own check, here so that a failure costs this record, not the shard
        except SampleError as err:
            return Skip(item.record, f"not storable ({err})", item.paths[-1], stage="write")
        return sample

    def _encode(self, batch: list[tuple[int, Loaded]], outcomes: dict, crashes: EncoderCrashes) -> None:
        """Encode a batch (each record alone if the batch fails, so one bad clip costs only itself)."""
        clips = [x.audio for _, x in batch] + [x.ref_audio for _, x in batch if x.ref_audio is not None]
        crashes.begin([x.record for _, x in batch])
        try:
            encoded = self.codec.encode(clips, batch_size=self.cfg.max_batch, dtype=encoder_dtype(self.cfg))
        except Exception as err:  # noqa: BLE001 - retried record by record below
            if len(batch) > 1:
                log.warning("a batch of %d records failed to encode (%s); encoding them one by one", len(batch), err)
                for entry in batch:
                    self._encode([entry], outcomes, crashes)
                return
            position, item = batch[0]
            outcomes[position] = Skip(item.record, f"encoding failed ({type(err).__name__}: {err})", stage="encode")
            return
        refs = iter(encoded[len(batch) :])
        for (position, item), main in zip(batch, encoded[: len(batch)], strict=True):
            ref = next(refs) if item.ref_audio is not None else None
            outcomes[position] = self._sample(item, main, ref)
        self.audio_seconds += sum(len(c) for c in clips) / 16000

    def shard(
        self, records: list[Record], progress, skips: list[Skip], crashes: EncoderCrashes
    ) -> Iterator[ShardSample]:
        """The samples of one shard in record order, yielded as soon as they are encoded; skips go to `skips`.

        A record waits only for the records before it (at most one batch and the loaders' results in flight),
        so the shard writer streams and nothing grows with `records_per_shard`.
        """
        budget = int(self.cfg.batch_seconds * 16000)
        outcomes: dict[int, ShardSample | Skip] = {}
        batch: list[tuple[int, Loaded]] = []
        done = 0

        def in_order() -> Iterator[ShardSample]:
            nonlocal done
            while done in outcomes:
                outcome = outcomes.pop(done)
                done += 1
                if isinstance(outcome, Skip):
                    skips.append(outcome)
                else:
                    yield outcome

        for position, result in self._loaded(records):
            if isinstance(result, Skip):
                outcomes[position] = result
            elif crashes.fatal(result.record):
                reason = "the encoder process died twice while encoding this record alone"
                outcomes[position] = Skip(result.record, reason, result.paths[-1], stage="encode")
            elif crashes.key(result.record) in crashes.suspects:
                self._encode([(position, result)], outcomes, crashes)
            else:
                batch.append((position, result))
                if sum(x.samples for _, x in batch) >= budget:
                    self._encode(batch, outcomes, crashes)
                    batch = []
            progress.update(1)
            yield from in_order()
        if batch:
            self._encode(batch, outcomes, crashes)
        yield from in_order()
        assert done == len(records) and not outcomes, "every record is encoded or skipped, once"


def run_slots(cfg: DictConfig, device: str, workers: int, slots: list[int], plan: dict, position: int = 0) -> None:
    """Encode every unfinished shard of `slots` on `device`, then write their manifests.

    A slot's records are read in chunks of `records_per_shard`, and a shard closes at the first chunk end where
    it holds `records_per_shard` samples (or at the slot's end): the shard count follows the usable records, so
    100,000 lines with few usable ones make a few full shards, not thousands of nearly empty ones. Each shard's
    `.json` records the chunks it covers; a rerun continues after the last one (at most one shard is redone).
    """
    output_dir = Path(cfg.output_dir)
    records = RecordIndex(plan["inputs"], cfg.base_path)
    count = min(len(records), int(cfg.limit)) if cfg.limit else len(records)
    per = plan["records_per_shard"]
    todo = []
    for slot in slots:
        mine = np.arange(slot, count, plan["num_slots"])
        chunks = [mine[i : i + per] for i in range(0, len(mine), per)]
        index, done = _finished(output_dir, slot)
        if done < len(chunks):
            todo.append((slot, index, done, chunks))
    if todo:
        encoder = ShardEncoder(cfg, device, workers)
        start = time.perf_counter()
        bar = tqdm(
            total=sum(len(c) for _, _, done, chunks in todo for c in chunks[done:]),
            unit="rec",
            position=position,
            disable=not cfg.progress,
            desc=f"{device} slots {slots[0]}..{slots[-1]}",
        )
        try:
            for slot, index, done, chunks in todo:
                while done < len(chunks):
                    done = _write_one_shard(
                        output_dir, shard_name(slot, index), chunks, done, per, encoder, records, bar
                    )
                    index += 1
                    hours = encoder.audio_seconds / 3600
                    rate = hours / ((time.perf_counter() - start) / 3600)
                    bar.set_postfix(audio_h=f"{hours:.2f}", h_per_h=f"{rate:.0f}")
        finally:
            bar.close()
            encoder.close()
    for slot in slots:
        write_slot_manifest(output_dir, slot, len(range(slot, count, plan["num_slots"])), per)


def _finished(output_dir: Path, slot: int) -> tuple[int, int]:
    """The slot's next shard index and the first chunk no finished shard covers."""
    index = done = 0
    while (meta := output_dir / f"{shard_name(slot, index)}.json").is_file():
        done = json.loads(meta.read_text()).get("chunks", [index, index + 1])[1]  # earlier layout: one chunk each
        index += 1
    return index, done


def _write_one_shard(output_dir, name, chunks, first, per, encoder, records, bar) -> int:
    """Encode chunks from `first` into shard `name` until it holds `per` samples; returns the next chunk."""
    skips, end = [], first
    (output_dir / name).unlink(missing_ok=True)  # a killed run's shard, never marked done
    crashes = EncoderCrashes(output_dir / f"{name}.encoding")

    def samples():
        nonlocal end
        held = 0
        while end < len(chunks) and held < per:
            for sample in encoder.shard(records.take(chunks[end]), bar, skips, crashes):
                held += 1
                yield sample
            end += 1

    entry = write_shard(output_dir / name, _unchanged(samples(), records, name, output_dir))
    if not entry["samples"]:  # the slot's last chunks held nothing usable: no shard, only its record
        (output_dir / name).unlink()
    entry.update(chunks=[first, end], skipped=[s.to_json() for s in skips])
    atomic_write(output_dir / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(entry) + "\n"))  # done
    crashes.close()
    return end


def _unchanged(samples: Iterator[ShardSample], records: RecordIndex, name: str, output_dir: Path):
    """`samples`, then a check that no input changed while they were made, before the shard takes its name.

    The check fails inside the shard's atomic write, so the shard of a changed input never appears as a `.tar`
    (a reader would take it for a finished shard with text from the new file beside shards from the old one).
    """
    yield from samples
    if changed := records.changed():  # its lines were indexed at the start: they no longer match
        raise ConfigError(
            f"{changed} changed while it was being preprocessed; shard {name} was not written. Let it settle, then "
            f"run again into a new output_dir (or delete {output_dir})"
        )


def write_slot_manifest(output_dir: Path, slot: int, records: int, per: int) -> None:
    """`manifest-<slot>.json` and `skipped-<slot>.jsonl` from the finished shards of a slot (once all are done)."""
    chunks = (records + per - 1) // per
    index, done = _finished(output_dir, slot)
    if done < chunks:
        return  # unfinished: the rerun writes the manifest
    entries, skipped = [], []
    for i in range(index):
        entry = json.loads((output_dir / f"{shard_name(slot, i)}.json").read_text())
        skipped += entry.pop("skipped")
        entry.pop("chunks", None)
        if entry["samples"]:
            entries.append(entry)
    write_manifest(output_dir / f"manifest-{slot:05d}.json", entries)
    text = "".join(json.dumps(s) + "\n" for s in skipped)
    atomic_write(output_dir / f"skipped-{slot:05d}.jsonl", lambda tmp: tmp.write_text(text))


def _device_main(cfg_yaml: str, device: str, workers: int, slots: list[int], plan: dict, position: int) -> None:
    run_slots(OmegaConf.create(cfg_yaml), device, workers, slots, plan, position)


def preprocess(cfg: DictConfig) -> dict:
    """Run (or resume) the pipeline for this process; returns counts for this process's slots.

    SIGTERM and SIGUSR1 stop it as Ctrl-C does; finished shards stand and a rerun continues after them.
    """
    check_arguments(cfg)
    if storage.is_remote(cfg.output_dir):  # written in a local work folder, each finished shard uploaded
        local = OmegaConf.merge(cfg, {"output_dir": work_folder(cfg.output_dir, cfg.get("work_dir"))})
        with Publisher(str(cfg.output_dir), Path(local.output_dir)):
            summary = preprocess(local)
        print(f"published to {cfg.output_dir} (made in {local.output_dir}, where a rerun on this machine continues)")
        return summary
    rank, world, local_rank = launcher_rank()
    with contextlib.ExitStack() as held:
        # ranks of one job share output_dir by design (each its own slots): one process alone locks it
        held.callback(OutputFolder(cfg.output_dir, "preprocess", resumable=True).open(lock=world == 1).release)
        held.enter_context(stop_signals_interrupt())  # finished shards stand; a rerun resumes
        return _preprocess(cfg, rank, world, local_rank)


def _preprocess(cfg: DictConfig, rank: int, world: int, local_rank: int | None) -> dict:
    devices = local_devices(cfg.devices, local_rank)
    cores = os.cpu_count() or 1
    workers = int(cfg.cpu_workers) if cfg.cpu_workers != "auto" else max(1, cores // len(devices) - 1)
    output_dir, processes, made = Path(cfg.output_dir), world * len(devices), journal(cfg)
    if changed := made.changes():
        raise ConfigError(
            f"{output_dir} was written from other sources ({'; '.join(changed)}): its shards would mix with "
            f"new ones; use a new output_dir, or delete {output_dir} to start again"
        )
    split = made.begin({"num_slots": processes})  # fixed by the first run
    plan = {**split, "inputs": list(made.made_from["inputs"]), "records_per_shard": made.made_from["records_per_shard"]}
    assignments = [
        (d, list(range(rank * len(devices) + i, plan["num_slots"], processes))) for i, d in enumerate(devices)
    ]
    assignments = [(d, s) for d, s in assignments if s]
    if len(assignments) == 1:
        run_slots(cfg, assignments[0][0], workers, assignments[0][1], plan)
    elif assignments:
        ctx = mp.get_context("spawn")
        jobs = [
            ctx.Process(target=_device_main, args=(OmegaConf.to_yaml(cfg), d, workers, s, plan, i))
            for i, (d, s) in enumerate(assignments)
        ]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join()
        failed = [j.exitcode for j in jobs if j.exitcode]
        if failed:
            raise RuntimeError(f"{len(failed)} encoder processes failed (exit codes {failed}); rerun to resume")
    return summarize(output_dir, [s for _, slots in assignments for s in slots])


class PreprocessSettings(TypedDict, total=False):
    """conf/preprocess.yaml's settings with their limits (the codec's are checked by `codec_problems`)."""

    inputs: str | list[str]
    output_dir: str
    work_dir: str | None
    base_path: str | None
    devices: Literal["auto", "cpu"] | list[Size]
    cpu_workers: Literal["auto"] | Workers  # 0: audio is loaded in the encoder process
    records_per_shard: Annotated[int, Field(ge=1, le=1_000_000)]
    batch_seconds: Seconds
    max_batch: Count
    codec_dtype: Literal["float32", "bfloat16", "float16"]
    record_timeout: Seconds
    limits: Limits
    limit: Count | None
    progress: bool


def check_arguments(cfg: DictConfig) -> None:
    """Every problem of the command at once, each with its fix, before anything is written or loaded."""
    problems = require(cfg, {"inputs": "[/data/train.jsonl]", "output_dir": "/data/shards"})
    problems += check_mapping(cfg, PreprocessSettings)
    if not problems:
        inputs = [cfg.inputs] if isinstance(cfg.inputs, str) else list(cfg.inputs)
        problems += [
            f"inputs: {given} is not a file; list JSONL files, e.g. inputs=[/data/train.jsonl]"
            for given in inputs
            if not Path(str(given)).is_file()
        ]
    problems += codec_problems(cfg.codec)
    if not OmegaConf.is_missing(cfg, "output_dir") and cfg.output_dir is not None:
        if storage.is_remote(cfg.output_dir):
            problems += store_problems(str(cfg.output_dir))
        else:
            problems += OutputFolder(cfg.output_dir, "preprocess", resumable=True).problems()
    fail("invalid preprocessing command", problems)


def summarize(output_dir: Path, slots: list[int]) -> dict:
    """Samples, frames and skip reasons over the manifests of `slots`; printed as the run's last lines."""
    samples = frames = 0
    reasons: Counter = Counter()
    for slot in slots:
        manifest = output_dir / f"manifest-{slot:05d}.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            samples, frames = samples + data["samples"], frames + data["frames"]
        skipped = output_dir / f"skipped-{slot:05d}.jsonl"
        if skipped.is_file():
            for line in skipped.read_text().splitlines():
                reasons[json.loads(line)["reason"].split(" (")[0]] += 1
    summary = {
        "samples": samples,
        "hours": frames / FRAME_RATE / 3600,
        "skipped": sum(reasons.values()),
        "skip_reasons": dict(reasons),
        # Peak resident memory of this process and of the largest finished child (loader or device process).
        "peak_rss_mb": {
            "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        },
    }
    print(
        f"encoded {samples} samples ({summary['hours']:.2f} h of audio) into {output_dir}; "
        f"skipped {summary['skipped']}: " + ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
    )
    print(
        f"peak memory: {summary['peak_rss_mb']['main']:.0f} MB (this process), "
        f"{summary['peak_rss_mb']['children']:.0f} MB (largest child process)"
    )
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m data_pipelines.preprocess key=value ...`."""
    preprocess(cfg)


if __name__ == "__main__":
    run(main, Path(__file__).parents[1] / "conf", "preprocess")
