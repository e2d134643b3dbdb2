"""The schemas generated from the targets' signatures refuse unknown settings and wrong types, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from moss.config_checks import validate
from moss.config_schema import schema_problems
from moss.errors import ConfigError
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


def test_every_unknown_key_and_wrong_type_is_named_with_the_target_and_the_fix():
    cfg = {"job": {"_target_": f"{HERE}.plain", "step": 3, "rate": "fast", "limit": "none", "flags": ["x"]}}
    problems = schema_problems(OmegaConf.create(cfg))
    assert len(problems) == 4, problems
    assert f"job.step is not a setting of {HERE}.plain; did you mean job.steps?" in problems[0]
    refused = {p.split("=")[0]: p for p in problems[1:]}
    assert set(refused) == {"job.rate", "job.limit", "job.flags"}
    assert "takes float for rate" in refused["job.rate"]
    assert "takes int or None for limit" in refused["job.limit"]


def test_valid_values_interpolations_and_unset_values_pass():
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "job": {"_target_": f"{HERE}.plain", "steps": "${seed}", "rate": 2, "limit": None, "flags": [1, 2]},
            "later": {"_target_": f"{HERE}.plain", "steps": "???", "_partial_": True},
        }
    )
    assert schema_problems(cfg) == []


def test_a_target_taking_any_keyword_has_only_its_named_parameters_checked():
    ok = {"_target_": f"{HERE}.open_ended", "steps": 2, "anything": "goes"}
    assert schema_problems({"job": ok}) == []
    problems = schema_problems({"job": {**ok, "steps": "two"}})
    assert len(problems) == 1 and problems[0].startswith("job.steps='two' is refused"), problems


def test_nested_targets_are_each_checked_against_their_own_signature():
    inner = {"_target_": f"{HERE}.Record", "size": "big"}
    problems = schema_problems({"outer": {"_target_": f"{HERE}.takes_record", "record": inner, "scale": 2}})
    assert problems == [
        f"outer.record.size='big' is refused: {HERE}.Record takes int for size "
        f"(Value 'big' of type 'str' could not be converted to Integer)"
    ]


def test_a_target_that_cannot_be_loaded_is_named():
    [problem] = schema_problems({"job": {"_target_": "no_such_module.thing"}})
    assert problem.startswith("job._target_=no_such_module.thing cannot be loaded")


def test_the_training_check_refuses_a_wrong_type_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigError) as refused:
        validate(compose_train(tmp_path, ["data.num_workers=two", "model.gradient_clip_val=high"]))
    message = str(refused.value)
    assert "data.num_workers='two' is refused: moss.data.datamodule.MossDataModule takes int" in message
    assert "model.gradient_clip_val='high' is refused" in message
