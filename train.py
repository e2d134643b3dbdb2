"""Fine-tune MOSS-TTSD. Usage: python train.py [experiment=NAME] [key=value ...] (see conf/train.yaml)."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
from pathlib import Path

import filelock
import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel

from moss.cli import command, run
from moss.config_checks import run_problems, validate
from moss.data.data_card import data_card, write_data_card
from moss.data.sanity import check_training_data
from moss.errors import ConfigError
from moss.outputs import OutputFolder, lock_folder, unlock_folder
from moss.training.callbacks import build_callbacks
from moss.training.export import TRAINING_CONFIG, export_hf, save_adapter, unsharded
from moss.training.launch import (
    quiet_known_warnings,
    relaunch_as_job,
    relaunched_rank,
    restored_environment,
    restored_signals,
)
from moss.training.plan import RawStage, RunPlan, plan_run, plan_sources, world_size
from moss.training.preemption import cluster_plugins
from moss.training.quality_gate import GATE_METRICS
from moss.training.run_checkpoint import AtomicCheckpointIO, load_best, read_position

log = logging.getLogger("train")


def resolve_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """`resume`: null -> fresh run; auto -> this run's furthest checkpoint if any; a path is used as given.

    `auto` takes the checkpoint at the highest training step, never the newest file: `best.ckpt` is written
    whenever validation improves, and may be newer than a later `last.ckpt` (at one step, `last.ckpt`, then a
    `step_*` file, then `best.ckpt`). Checkpoints are written atomically, but a file can still be cut short (a
    copy, a hand-made file): those are passed over, each with its reason.
    """
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = list((output_dir / "checkpoints").glob("*.ckpt"))
        rank = {"last.ckpt": 2, "best.ckpt": 0}
        usable = []
        for path in found:
            step, problem = read_position(path)
            if problem is None:
                usable.append((step, rank.get(path.name, 1), path.stat().st_mtime_ns, path))
            else:
                log.warning("resume=auto: passing over %s (%s)", path, problem)
        if usable:
            step, *_, path = max(usable)
            log.info("resume=auto: continuing from %s (step %d)", path, step)
            return str(path)
        if found:
            raise ConfigError(
                f"resume=auto: none of the {len(found)} checkpoints in {output_dir / 'checkpoints'} loads (see the "
                f"warnings above); move them away to start again from step 0, or give resume=/path/to/a.ckpt"
            )
        log.warning("resume=auto: no checkpoint in %s; starting from step 0", output_dir / "checkpoints")
        return None
    log.info("resume: continuing from %s", cfg.resume)
    return str(cfg.resume)


def record_config(cfg: DictConfig, output_dir: Path) -> None:
    """Write the run's config (and, under Hydra, its overrides) to `<run>/.hydra/`, after the checks pass."""
    folder = output_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # called directly (tests), not by Hydra
        return
    OmegaConf.save(OmegaConf.create(overrides), folder / "overrides.yaml")


def train(cfg: DictConfig) -> dict:
    """Plan the run, make its data, record the plan, fit, export; return what tests check.

    The config recorded in `<run>/.hydra/` is the one that runs (`moss.training.plan`): the model folder a Hub id
    resolved to, the shard folders of `raw.*`, the loader workers and the steps `data.epochs` came to.
    """
    cfg, stages = plan_sources(cfg)
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    with contextlib.ExitStack() as held:
        held.enter_context(restored_signals())
        if not relaunched_rank():
            held.callback(unlock_folder, own_run_folder(cfg, output_dir))
            for stage in stages:
                preprocess_raw(cfg, stage)
        plan = plan_run(cfg, fit_workers=bool(stages))
        resume = resolve_resume(plan.cfg, output_dir)
        if not relaunched_rank():
            if resume is None:  # a fresh run: its data is checked once, before anything is recorded or trains
                check_training_data(plan.cfg, plan.datamodule, plan.tokenizer)
            record_config(plan.cfg, output_dir)
        return _fit_and_export(plan, output_dir, resume)


def own_run_folder(cfg: DictConfig, output_dir: Path) -> filelock.BaseFileLock:
    """Lock the run folder for this run; a second `train.py` with the same name is refused, not mixed in.

    The folder is checked again under the lock: of two runs started together, the second finds the first's
    lock (or, once that ended, its outputs) and stops with the usual message.
    """
    lock = lock_folder(output_dir, "training run (same paths.root and name)")
    if problems := run_problems(cfg):
        unlock_folder(lock)
        raise ConfigError("\n".join(problems))
    return lock


def _fit_and_export(plan: RunPlan, output_dir: Path, resume: str | None) -> dict:
    """The run itself, once its folder is this process's and its plan is final."""
    cfg = plan.cfg
    L.seed_everything(cfg.seed, workers=True)
    tokenizer, datamodule = plan.tokenizer, plan.datamodule  # built by the plan (data/epoch counts included)
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "config"}
    module = instantiate(model, _partial_=True)(config=plan.model_config)  # the plan's config, not a second one
    callbacks = build_callbacks(cfg.get("callbacks"))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    plugins = cluster_plugins(callbacks.get("preemption"))  # the callback, not Lightning, saves on SLURM's signal
    plugins.append(AtomicCheckpointIO())  # checkpoints written beside their final name (moss.outputs.atomic_write)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=list(callbacks.values()), logger=loggers or False, plugins=plugins
    )

    start = read_position(resume)[0] if resume else 0  # -1: unreadable, and fit says so; the history stays
    for logger in loggers:  # the rows of the steps before the resumed one are the run's history: kept
        if hasattr(logger, "keep_until") and start >= 0 and not relaunched_rank():
            logger.keep_until(start)
    if not relaunched_rank() and cfg.get("data_card") is not None:
        datamodule.prepare_data()  # the built-in corpus is generated on first use
        splits = {**datamodule.card_splits(), "val": cfg.data.get("val_shards")}
        card = data_card(splits, datamodule.builder, int(cfg.data_card.max_samples))
        write_data_card(card, output_dir / "data_card.json")
    # Checkpoints hold tensors and plain containers only: never unpickle anything else from a file.
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)

    stopped = getattr(callbacks.get("preemption"), "received", None)  # a stopped run exports when it finishes
    exported = export(cfg, module, tokenizer, callbacks, trainer) if cfg.export.enabled and not stopped else {}
    if exported.get("export") and "quality_gate" in callbacks and trainer.is_global_zero:
        from moss.training.eval_report import write_eval_report

        device = trainer.strategy.root_device
        exported["report"] = write_eval_report(
            callbacks["quality_gate"], cfg, module.config, exported["export"], device
        )
    summary = callbacks["throughput"].summary if "throughput" in callbacks else {}
    if trainer.is_global_zero:
        _report(trainer, output_dir, exported, summary, stopped, plan.epochs)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the next job of a multirun starts its own group
    return {
        "plan": plan.epochs,
        "cfg": cfg,
        "trainer": trainer,
        "module": module,
        "output_dir": output_dir,
        "exported": exported,
        "summary": summary,
        "stopped": stopped,
    }


def export(cfg: DictConfig, module, tokenizer, callbacks: dict, trainer: L.Trainer) -> dict:
    """The run's model as an HF folder (+ adapter): the best or the last weights (`export.from`)."""
    output_dir, exported = Path(cfg.paths.output_dir), {}
    if cfg.export["from"] == "best":
        exported["weights"] = load_best(trainer, module, callbacks.get("best_checkpoint"))
    model = unsharded(module.model, module.hparams.peft, trainer.is_global_zero)  # collective under FSDP
    if model is None:
        return exported
    if module.hparams.peft and module.hparams.path:  # lets infer.py find the base of the adapter
        # absolute: infer.py may run from another directory
        model.peft_config["default"].base_model_name_or_path = str(Path(module.hparams.path).resolve())
    sampling = OmegaConf.to_container(cfg.export.sampling) if cfg.export.get("sampling") is not None else None
    # Both folders are the run's own (its folder is locked): whatever they hold came from its earlier attempts,
    # also before the record existed, so a resumed run replaces it, each file atomically.
    with OutputFolder(output_dir / "export", "export", overwrite=True).check().staged() as stage:
        export_hf(model, stage, tokenizer, layout=cfg.export.layout, sampling=sampling)
        OmegaConf.save(cfg, stage / TRAINING_CONFIG, resolve=True)
    exported["export"], exported["adapter"] = output_dir / "export", None
    if isinstance(model, PeftModel):
        with OutputFolder(output_dir / "adapter", "adapter", overwrite=True).check().staged() as stage:
            save_adapter(model, stage)
        exported["adapter"] = output_dir / "adapter"
    return exported


def preprocess_raw(cfg: DictConfig, stage: RawStage) -> None:
    """Preprocess the stage's JSONL into its folder with the run's codec: resumed where it stopped, redone if stale."""
    from data_pipelines.preprocess import preprocess, preprocess_config, stale_reason

    inputs, out = list(stage.inputs), stage.folder

    settings = OmegaConf.to_container(cfg.raw.settings, resolve=True) if cfg.raw.get("settings") else {}
    if "records_per_shard" not in settings:  # enough shards for every reader, 4 each, as a small set needs
        readers = world_size(cfg) * max(1, int(cfg.data.num_workers))
        records = sum(1 for f in inputs for line in open(f, "rb") if line.strip())
        settings["records_per_shard"] = max(1, min(1000, math.ceil(records / (4 * readers))))
    pcfg = preprocess_config(inputs, out, cfg.codec, **settings)
    reason = stale_reason(pcfg)
    if reason and cfg.get("resume"):
        raise ConfigError(
            f"{out} was made from other sources ({reason}), so this run's data position cannot be continued; "
            f"start a new run (name=...) on the new data, or restore the earlier inputs to resume"
        )
    if reason:
        log.warning("%s was made from other sources (%s): preprocessing again", out, reason)
        shutil.rmtree(out)
    log.info("preprocessing %s into %s (done shards are kept)", ", ".join(inputs), out)
    preprocess(pcfg)


def _report(
    trainer: L.Trainer, output_dir: Path, exported: dict, summary: dict, stopped: str | None, plan=None
) -> None:
    shown = ("train/loss", "val/loss", *(f"val/{name}" for name in GATE_METRICS))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in shown}
    lines = [f"run directory: {output_dir}", f"checkpoints:   {output_dir / 'checkpoints'}"]
    if stopped:
        lines.insert(
            0,
            f"stopped by {stopped} at step {trainer.global_step} of {trainer.max_steps}, checkpoint saved; "
            f"continue with the same command plus resume=auto",
        )
    early = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    if early is not None and early.wait_count >= early.patience and not stopped:
        lines.insert(
            0,
            f"early stopping ended the run at step {trainer.global_step} of {trainer.max_steps}: {early.wait_count} "
            f"validations without a {early.monitor} {'lower' if early.mode == 'min' else 'higher'} than "
            f"{float(early.best_score):.4f} by {early.min_delta:g} "
            f"(callbacks.early_stopping.patience={early.patience})",
        )
    lines += [f"{name + ':':<14} {path}" for name, path in exported.items() if path]
    if trainer.loggers:
        lines.append(f"logs:          {trainer.loggers[0].log_dir}")
    if summary:
        lines.append(
            f"throughput:    {summary['real_frames_per_s']:.0f} real frames/s, packing efficiency "
            f"{summary['packing_efficiency']:.1%}, {summary['wall_s']:.1f} s of training"
        )
    if plan is not None and summary.get("samples"):
        epochs = summary["samples"] / plan.samples
        lines.append(
            f"epochs:        {epochs:.2f} trained ({summary['samples']} samples; data.epochs={plan.epochs:g} planned "
            f"{plan.steps_per_epoch} steps per epoch, measured {trainer.global_step / epochs:.1f})"
        )
    if len(summary.get("sources") or {}) > 1:
        per = {s.name: s.samples for s in plan.sources} if plan is not None else {}
        lines.append(
            "sources:       "
            + ", ".join(
                f"{name} {n} samples" + (f" ({n / per[name]:.2f} epochs)" if per.get(name) else "")
                for name, n in summary["sources"].items()
            )
        )
    if metrics:
        lines.append("final:         " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    else:  # resume=auto of a finished run: nothing trained or validated now; its curve is in the logs
        lines.append(f"final:         none logged now: the run was already at step {trainer.global_step} of max_steps")
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@command
def main(cfg: DictConfig) -> None:
    """Process-level settings, then `train`; exit status 130 when Ctrl-C stopped the run (after saving it)."""
    relaunch_as_job()  # DDP ranks > 0 re-run this job, not the whole multirun sweep
    quiet_known_warnings()
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    logging.getLogger("moss").setLevel(logging.INFO)
    logging.getLogger("train").setLevel(logging.INFO)
    with restored_environment():  # Lightning's rank variables must not leak into the next multirun job
        result = train(cfg)
    if result["stopped"] == "SIGINT":
        sys.exit(130)


if __name__ == "__main__":
    run(main, Path(__file__).parent / "conf", "train")
