"""One check: every setting against the annotation of the parameter that takes it, every problem in one line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from moss.config_checks import validate
from moss.config_schema import schema_problems
from moss.errors import ConfigError
from moss.settings import Count, Positive, Probability, Required, Rows, TypedDict, strict
from tests.conftest import compose_train

HERE = __name__


def plain(steps: int, rate: float = 1e-3, limit: int | None = None, name: str = "a", flags: list[int] | None = None):
    """A target with typed parameters (PEP 604 optional included)."""


def open_ended(steps: int = 1, **kwargs):
    """A target that takes any keyword: only the named parameters are checked."""


@dataclass
class Record:
    size: int = 1


def takes_record(record: Record, scale: float = 1.0):
    """A dataclass-typed parameter is given as a node of its own (transformers' configs are dataclasses)."""


@strict
class Inner(TypedDict, total=False):
    budget: Required[Rows]
    share: Probability


def limited(count: Count = 1, rate: Positive = 1.0, inner: Inner | None = None, table: dict[str, Inner] | None = None):
    """A target whose parameters declare their limits (`moss.settings`)."""


def test_every_unknown_key_and_wrong_type_is_named_with_the_target_and_the_fix():
    cfg = {"job": {"_target_": f"{HERE}.plain", "step": 3, "rate": "fast", "limit": "none", "flags": ["x"]}}
    problems = schema_problems(OmegaConf.create(cfg))
    assert len(problems) == 4, problems
    assert f"job.step is not a setting of {HERE}.plain; did you mean job.steps?" in problems[0]
    refused = {p.split("=")[0]: p for p in problems[1:]}
    assert set(refused) == {"job.rate", "job.limit", "job.flags.0"}
    assert "job.rate='fast' is refused: input should be a valid number" in refused["job.rate"]
    assert refused["job.rate"].endswith(f"({HERE}.plain)")
    assert "job.limit='none' is refused: input should be a valid integer" in refused["job.limit"]


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"count": 0}, "job.count=0 is refused: input should be greater than or equal to 1"),
        ({"count": -3}, "job.count=-3 is refused: input should be greater than or equal to 1"),
        ({"rate": float("nan")}, "job.rate=nan is refused: input should be a finite number"),
        ({"rate": float("inf")}, "job.rate=inf is refused: input should be a finite number"),
        ({"rate": 0}, "job.rate=0 is refused: input should be greater than 0"),
        (
            {"inner": {"budget": 10**12}},
            "job.inner.budget=1000000000000 is refused: input should be less than or equal",
        ),
        (
            {"inner": {"budget": 8, "share": 1.5}},
            "job.inner.share=1.5 is refused: input should be less than or equal to 1",
        ),
        ({"inner": {"budget": 8, "shar": 0.5}}, "job.inner.shar is not a setting of"),
        ({"inner": {"share": 0.5}}, "job.inner.budget is required"),
        ({"inner": [1, 2]}, "job.inner=[1, 2] is refused: input should be a valid dictionary"),
        ({"inner": "x"}, "job.inner='x' is refused"),
        ({"table": ["a"]}, "job.table=['a'] is refused: input should be a valid dictionary"),
        ({"table": {"a": {"budget": 0}}}, "job.table.a.budget=0 is refused"),
    ],
)
def test_limits_declared_beside_the_parameter_refuse_each_class_of_bad_value(settings, expected):
    problems = schema_problems({"job": {"_target_": f"{HERE}.limited", **settings}})
    assert len(problems) == 1 and expected in problems[0], problems
    assert "\n" not in problems[0]


def test_a_typo_inside_a_mapping_names_the_closest_key():
    problems = schema_problems({"job": {"_target_": f"{HERE}.limited", "inner": {"budgt": 8}}})
    assert any("job.inner.budgt is not a setting of" in p and "did you mean job.inner.budget?" in p for p in problems)
    assert any(p.startswith("job.inner.budget is required") for p in problems), problems


def test_every_problem_is_reported_at_once():
    settings = {"count": 0, "rate": float("nan"), "inner": {"budget": 0, "share": 2}}
    problems = schema_problems({"job": {"_target_": f"{HERE}.limited", **settings}})
    assert sorted(p.split("=")[0] for p in problems) == ["job.count", "job.inner.budget", "job.inner.share", "job.rate"]


def test_valid_values_interpolations_and_unset_values_pass():
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "job": {"_target_": f"{HERE}.plain", "steps": "${seed}", "rate": 2, "limit": None, "flags": [1, 2]},
            "later": {"_target_": f"{HERE}.plain", "steps": "???", "_partial_": True},
            "ok": {"_target_": f"{HERE}.limited", "count": 2, "inner": {"budget": 8}, "table": {"a": {"budget": 1}}},
        }
    )
    assert schema_problems(cfg) == []


def test_interpolation_loops_and_unset_environment_variables_are_named(monkeypatch):
    monkeypatch.delenv("MOSS_NOT_SET", raising=False)
    cfg = OmegaConf.create({"a": "${b}", "b": "${a}", "c": "${oc.env:MOSS_NOT_SET}", "d": "${c}"})
    problems = schema_problems(cfg)
    assert any(p.startswith("a cannot be resolved: Recursive interpolation detected") for p in problems), problems
    assert [p for p in problems if "MOSS_NOT_SET" in p] == [
        "c cannot be resolved: KeyError raised while resolving interpolation: \"Environment variable 'MOSS_NOT_SET' "
        'not found"; fix or override c'
    ]  # d depends on c: one line for the cause


def test_a_target_taking_any_keyword_has_only_its_named_parameters_checked():
    ok = {"_target_": f"{HERE}.open_ended", "steps": 2, "anything": "goes"}
    assert schema_problems({"job": ok}) == []
    problems = schema_problems({"job": {**ok, "steps": "two"}})
    assert len(problems) == 1 and problems[0].startswith("job.steps='two' is refused"), problems


def test_nested_targets_are_each_checked_against_their_own_signature():
    inner = {"_target_": f"{HERE}.Record", "size": "big"}
    problems = schema_problems({"outer": {"_target_": f"{HERE}.takes_record", "record": inner, "scale": 2}})
    assert problems == [
        f"outer.record.size='big' is refused: input should be a valid integer, unable to parse string as an integer "
        f"({HERE}.Record)"
    ]


def test_a_target_that_cannot_be_loaded_is_named():
    [problem] = schema_problems({"job": {"_target_": "no_such_module.thing"}})
    assert problem.startswith("job._target_=no_such_module.thing cannot be loaded")


def test_the_training_check_refuses_a_wrong_type_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigError) as refused:
        validate(compose_train(tmp_path, ["data.num_workers=two", "model.gradient_clip_val=high"]))
    message = str(refused.value)
    assert "data.num_workers='two' is refused: input should be a valid integer" in message
    assert "(moss.data.datamodule.MossDataModule)" in message
    assert "model.gradient_clip_val='high' is refused" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.num_workers=-1", "data.num_workers=-1 is refused: input should be greater than or equal to 0"),
        ("data.packing.budget=0", "data.packing.budget=0 is refused"),
        ("data.packing.budget=1e12", "data.packing.budget=1000000000000.0 is refused"),
        ("data.packing.min_fill=2", "data.packing.min_fill=2 is refused"),
        ("+data.packing.budgt=3", "data.packing.budgt is not a setting of moss.data.datamodule.MossDataModule; did"),
        ("data.epochs=inf", "data.epochs=inf is refused: input should be a finite number"),
        ("data.shuffle_buffer=-5", "data.shuffle_buffer=-5 is refused"),
        ("data.accumulate_grad_batches=0", "data.accumulate_grad_batches=0 is refused"),
        ("data.overlong=trim", "data.overlong='trim' is refused: input should be 'skip' or 'truncate'"),
        ("data.sources=[a,b]", "data.sources=['a', 'b'] is refused: input should be a valid dictionary"),
        ("data.sources=foo", "data.sources='foo' is refused: input should be a valid dictionary"),
        ("data.sources={x:{shards:/b,wieght:1}}", "did you mean data.sources.x.weight?"),
        ("data.sources={x:{shards:/b,weight:0}}", "data.sources.x.weight=0 is refused"),
        ("model.gradient_clip_val=-1", "model.gradient_clip_val=-1 is refused"),
        ("model.optimizer.lr=nan", "model.optimizer.lr=nan is refused: input should be a finite number"),
        ("model.scheduler.warmup_ratio=1.5", "model.scheduler.warmup_ratio=1.5 is refused"),
        ("model.speedups.varlen_bucket=0", "model.speedups.varlen_bucket=0 is refused"),
        ("model.gradient_checkpointing=some", "model.gradient_checkpointing='some' is refused"),
        ("model.net.attn_implementation=flash", "model.net.attn_implementation='flash' is refused"),
        ("model.channel_weights=[1,-1]", "model.channel_weights.1=-1 is refused"),
        ("callbacks.progress.interval_s=-1", "callbacks.progress.interval_s=-1 is refused"),
        ("callbacks.early_stopping.mode=up", "callbacks.early_stopping.mode='up' is refused"),
        ("callbacks.preemption.signals=[SIGKILL]", "callbacks.preemption.signals.0='SIGKILL' is refused"),
        ("callbacks.best_checkpoint.monitor=val/los", "did you mean callbacks.best_checkpoint.monitor=val/loss?"),
        ("trainer.max_steps=0", "trainer.max_steps=0 is refused"),
        ("trainer.val_check_interval=-1", "trainer.val_check_interval=-1 is refused"),
        ("trainer.devices=100000", "trainer.devices=100000 would start 100000 training processes on the CPU"),
        ("seed=-1", "seed=-1 is refused"),
        ("sanity_check.samples=-3", "sanity_check.samples=-3 is refused"),
        ("sanity_check.asr_language=klingon", "'klingon' is not a language Whisper knows; e.g. en, zh, english"),
        ("export.from=newest", "export.from='newest' is refused: input should be 'best' or 'last'"),
        ("float32_matmul_precision=ultra", "float32_matmul_precision='ultra' is refused"),
        ("name=${name}", "name cannot be resolved: Recursive interpolation detected"),
        ("paths.root=${oc.env:MOSS_NOT_SET}", "paths.root cannot be resolved"),
    ],
)
def test_the_training_config_refuses_each_bad_setting_in_one_line(tmp_path, override, expected):
    with pytest.raises(ConfigError) as refused:
        validate(compose_train(tmp_path, [override]))
    lines = str(refused.value).splitlines()[1:]
    assert any(expected in line for line in lines), lines


@pytest.mark.parametrize(
    "command, overrides, expected",
    [
        ("preprocess", ["records_per_shard=0"], "records_per_shard=0 is refused"),
        ("preprocess", ["limits.max_seconds=-1"], "limits.max_seconds=-1 is refused: input should be greater than 0"),
        ("preprocess", ["+limits.max_secs=3"], "limits.max_secs is not a setting of PreprocessSettings; did you mean"),
        ("preprocess", ["cpu_workers=-2"], "cpu_workers=-2 is refused"),
        ("preprocess", ["cpu_workers=1000"], "cpu_workers=1000 is refused"),
        ("preprocess", ["record_timeout=inf"], "record_timeout=inf is refused: input should be a finite number"),
        ("transcribe", ["windows.max_seconds=2000"], "windows.max_seconds=2000 is refused"),
        ("transcribe", ["vad.threshold=2"], "vad.threshold=2 is refused: input should be less than or equal to 1"),
        ("transcribe", ["diarisation.num_speakers=0"], "diarisation.num_speakers=0 is refused"),
        ("transcribe", ["workers=-1"], "workers=-1 is refused"),
        ("transcribe", ["asr_language=klingon"], "asr_language='klingon' is refused: value error, 'klingon' is not a"),
        ("transcribe", ["single_speaker=x"], "single_speaker='x' is refused: input should be 'pairs' or 'dialogues'"),
    ],
)
def test_the_data_commands_declare_their_settings_too(tmp_path, command, overrides, expected):
    from importlib import import_module

    from tests.conftest import compose_config

    required = {"preprocess": ["inputs=[x.jsonl]", "codec=tiny"], "transcribe": ["input=x"]}[command]
    cfg = compose_config(command, [*required, f"output_dir={tmp_path / 'out'}", *overrides])
    with pytest.raises(ConfigError) as refused:
        import_module(f"data_pipelines.{command}").check_arguments(cfg)
    assert any(expected in line for line in str(refused.value).splitlines()), str(refused.value)


def test_a_few_more_cpu_ranks_than_cores_is_a_warning_and_many_more_are_refused(tmp_path, caplog, monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    validate(compose_train(tmp_path, ["trainer.devices=3"]))  # 3 ranks on 2 cores: slow, and tests do it
    assert "trainer.devices=3 would start 3 training processes on the CPU, and this machine has 2 cores" in caplog.text
    with pytest.raises(ConfigError, match="trainer.devices=9 would start 9 training processes"):
        validate(compose_train(tmp_path, ["trainer.devices=9"]))


def test_the_readmes_peak_tflops_override_is_a_setting(tmp_path):
    validate(compose_train(tmp_path, ["callbacks.throughput.peak_tflops=989"]))  # README "Throughput"
    with pytest.raises(ConfigError, match=r"callbacks.throughput.peak_tflops=-1 is refused"):
        validate(compose_train(tmp_path, ["callbacks.throughput.peak_tflops=-1"]))
