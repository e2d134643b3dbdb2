"""Weighted data sources (`data.sources`): the mix's proportions, exact resume, sources of unequal size, the plan."""

import csv
import dataclasses
import json
import re
from collections import Counter

import pytest
from omegaconf import OmegaConf

from moss.config_schema import schema_problems
from moss.data.dataset import ShardStream, expand_shards
from moss.data.epochs import plan_source_epochs
from moss.data.examples import ExampleBuilder
from moss.data.mixing import Source, source_specs
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.errors import ConfigError
from moss.text import PromptBuilder
from tests.conftest import compose_train

PACKER = {"budget": 512, "window": 16, "min_fill": 0.97}


@pytest.fixture
def builder(tiny_tokenizer):
    return ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368, max_rows=512)


def write_source(folder, name: str, samples: int, seed: int, per_shard: int = 8) -> list[str]:
    """A shard set whose sample keys all start with `name-` (so a key tells its source)."""
    renamed = [dataclasses.replace(s, key=f"{name}-{s.key}") for s in generate_samples(samples, seed=seed)]
    write_shards(renamed, folder / name, prefix=name, max_samples=per_shard)
    return expand_shards(str(folder / name))


@pytest.fixture
def two_sources(tmp_path):
    """`small` (24 samples, 3 shards) and `large` (160 samples, 20 shards)."""
    return {
        "small": write_source(tmp_path, "small", 24, seed=11),
        "large": write_source(tmp_path, "large", 160, seed=12),
    }


def mixed(sources: dict, weights: dict, builder, packed=True, repeat=True, seed=7) -> ShardStream:
    srcs = [Source(name, tuple(urls), weights[name]) for name, urls in sources.items()]
    if packed:
        return ShardStream(srcs, builder, repeat, True, seed=seed, shuffle_buffer=8, packer=PACKER, packs_per_batch=2)
    return ShardStream(srcs, builder, repeat, True, seed=seed, shuffle_buffer=8, batch_size=3)


def source_of(key: str) -> str:
    return key.split("-", 1)[0]


def test_the_mix_follows_the_weights_over_many_packs(two_sources, builder):
    """Samples per source, counted from the keys (independently of the stream's own counts), match the weights."""
    stream = iter(mixed(two_sources, {"small": 0.8, "large": 0.2}, builder))
    by_key, by_stats = Counter(), Counter()
    for _ in range(150):
        batch = next(stream)
        by_key.update(source_of(k) for k in batch.stats.keys)
        by_stats.update(batch.stats.sources)
    total = sum(by_key.values())
    assert by_key == by_stats and total > 1000
    assert by_key["small"] / total == pytest.approx(0.8, abs=0.04)  # binomial sd ~0.012 at this count


def test_the_small_source_repeats_while_the_large_one_is_in_its_first_pass(two_sources, builder):
    """Replay: the exhausted source starts a new pass on its own; each pass of it reads each sample once."""
    stream = mixed(two_sources, {"small": 0.5, "large": 0.5}, builder, packed=False)
    keys = []
    for batch in stream:
        keys += batch.stats.keys
        if len(keys) >= 110:
            break
    readers = stream.state_dict()["reader"]["readers"]
    small = Counter(k for k in keys if source_of(k) == "small")
    assert readers[0]["epoch"] >= 2 and readers[1]["epoch"] == 0  # small: 2+ passes; large: still its first
    assert len(small) == 24 and max(small.values()) - min(small.values()) <= 1  # every sample once per pass
    large = [k for k in keys if source_of(k) == "large"]
    assert len(large) == len(set(large))


@pytest.mark.parametrize("packed", [True, False])
def test_resuming_a_mixed_stream_at_any_micro_batch_continues_exactly(two_sources, builder, packed):
    weights = {"small": 0.7, "large": 0.3}
    ref_stream = mixed(two_sources, weights, builder, packed)
    iterator = iter(ref_stream)
    states, batches = [], []
    for _ in range(30):  # the small source passes more than once
        batches.append(next(iterator).stats.keys)
        states.append(json.loads(json.dumps(ref_stream.state_dict())))
    assert ref_stream.state_dict()["reader"]["readers"][0]["epoch"] >= 1
    for k in range(0, 27, 1 if packed else 2):
        resumed = mixed(two_sources, weights, builder, packed)
        resumed.load_state_dict(states[k])
        again = iter(resumed)
        assert [next(again).stats.keys for _ in range(3)] == batches[k + 1 : k + 4], f"resumed after batch {k}"


def test_resuming_with_other_sources_is_refused(two_sources, builder):
    stream = mixed(two_sources, {"small": 0.5, "large": 0.5}, builder)
    next(iter(stream))
    swapped = mixed(dict(reversed(two_sources.items())), {"small": 0.5, "large": 0.5}, builder)
    swapped.load_state_dict(stream.state_dict())
    with pytest.raises(ConfigError, match=r"reads the sources \['small', 'large'\], this run \['large', 'small'\]"):
        next(iter(swapped))


def test_every_source_needs_a_shard_per_reader(two_sources, builder, monkeypatch):
    monkeypatch.setattr("moss.data.dataset.rank_and_world", lambda: (0, 4))
    with pytest.raises(ConfigError, match="data.sources.small.shards has 3 shards but 4 ranks"):
        next(iter(mixed(two_sources, {"small": 0.5, "large": 0.5}, builder)))


@pytest.mark.parametrize(
    ("shards", "sources", "epochs", "message"),
    [
        (None, None, None, "data.train_shards or data.sources is required"),
        ("/a", {"x": {"shards": "/b"}}, None, "set data.train_shards=null beside data.sources"),
        (None, {"x": {"shards": "/b"}}, 2, r"data.sources.<name>.epochs"),
    ],
)
def test_conflicting_sources_are_refused_with_the_setting_named(shards, sources, epochs, message):
    with pytest.raises(ConfigError, match=message):
        source_specs(shards, sources, epochs)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ({"x": {"shards": "/b", "weight": 0}}, "data.sources.x.weight=0 is refused: input should be greater than 0"),
        (
            {"x": {"shards": "/b", "wieght": 1}},
            "data.sources.x.wieght is not a setting of .*did you mean data.sources.x.weight",
        ),
        ({"x": "/b"}, "data.sources.x='/b' is refused: input should be a valid dictionary"),
        ({"x": {"weight": 1}}, "data.sources.x.shards is required"),
        ({"a b": {"shards": "/b"}}, "data.sources.a b is refused as a name: string should match pattern"),
        ({"x": {"shards": "/b", "epochs": -1}}, "data.sources.x.epochs=-1 is refused: input should be greater than 0"),
        ({"x": {"shards": "/b", "weight": float("inf")}}, "data.sources.x.weight=inf is refused: .*finite number"),
    ],
)
def test_malformed_sources_are_refused_by_the_config_check_with_the_setting_named(sources, message):
    node = {"_target_": "moss.data.datamodule.MossDataModule", "train_shards": None, "sources": sources}
    problems = schema_problems({"data": node})
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_one_shard_set_is_the_source_named_train():
    (spec,) = source_specs("/data/s", None, 3)
    assert (spec.name, spec.shards, spec.weight, spec.epochs) == ("train", "/data/s", 1.0, 3)


def test_the_plan_runs_as_long_as_the_planned_source_needs(two_sources, builder):
    """small: 24 samples at 0.8 for 2 epochs -> 30 draws per epoch; large (replayed, 0.2): 2 x 30 x 0.2 / 160."""
    sources = [
        Source("small", tuple(two_sources["small"]), 0.8, 2),
        Source("large", tuple(two_sources["large"]), 0.2, None),
    ]
    plan = plan_source_epochs(sources, builder, {**PACKER, "packs_per_batch": 2}, 1, world_size=1, accumulate=1)
    assert plan.lead == "small" and plan.samples == 30 and plan.epochs == 2
    small, large = plan.sources
    assert (small.samples, small.share, small.epochs) == (24, pytest.approx(0.8), pytest.approx(2))
    assert (large.samples, large.planned, large.epochs) == (160, None, pytest.approx(2 * 30 * 0.2 / 160))
    # Micro-batches per epoch of the lead in a real mixed stream, over many of its passes.
    stream = iter(mixed(two_sources, {"small": 0.8, "large": 0.2}, builder, seed=3))
    small = sum(source_of(k) == "small" for _ in range(120) for k in next(stream).stats.keys)
    assert plan.micro_batches_per_epoch == pytest.approx(120 / (small / 24), rel=0.1)
    assert "small 2.00 epochs of 24 samples at 80%, large 0.07 epochs of 160 samples at 20% (replayed)" in (
        plan.describe()
    )


def test_a_source_without_a_planned_epoch_count_is_not_the_lead(two_sources, builder):
    sources = [
        Source("small", tuple(two_sources["small"]), 0.1, None),
        Source("large", tuple(two_sources["large"]), 0.9, 1),
    ]
    plan = plan_source_epochs(sources, builder, None, 4, world_size=1, accumulate=1)
    assert plan.lead == "large" and plan.samples == round(160 / 0.9)
    assert plan.sources[0].epochs == pytest.approx(160 / 0.9 * 0.1 / 24)


@pytest.mark.slow
def test_a_run_over_two_sources_logs_each_and_cards_each(tmp_path, two_sources, capsys):
    """train.py with data.sources from the command line: per-source metrics, epochs, data card and summary."""
    from train import train

    small, large = tmp_path / "small", tmp_path / "large"
    sources = f"{{small: {{shards: {small}, weight: 0.75, epochs: 4}}, large: {{shards: {large}, weight: 0.25}}}}"
    overrides = ["data.train_shards=null", f"data.sources={sources}", "data.num_workers=0", "data.shuffle_buffer=8"]
    overrides += ["callbacks.throughput.window=2", "trainer.log_every_n_steps=2", "data_card.max_samples=50"]
    result = train(compose_train(tmp_path, overrides))
    plan = result["plan"]
    assert plan.lead == "small" and plan.samples == 32
    rows = list(csv.DictReader(open(result["output_dir"] / "logs" / "metrics.csv")))
    last = [r for r in rows if r.get("data/epoch_small")][-1]
    drawn = {name: float(last[f"data/samples_{name}"]) for name in ("small", "large")}
    assert drawn["small"] / sum(drawn.values()) == pytest.approx(0.75, abs=0.12)
    assert float(last["data/epoch_small"]) == pytest.approx(drawn["small"] / 24)
    assert float(last["data/epoch_small"]) == pytest.approx(4, rel=0.35)
    assert float(last["data/epoch_large"]) == pytest.approx(drawn["large"] / 160)
    card = json.loads((result["output_dir"] / "data_card.json").read_text())
    assert card["splits"]["train/small"]["samples"] == 24 and card["splits"]["train/large"]["samples"] == 160
    out = capsys.readouterr().out
    assert "sources:       small " in out and "large " in out
    recorded = OmegaConf.load(result["output_dir"] / ".hydra" / "config.yaml")
    assert recorded.trainer.max_steps == plan.max_steps


@pytest.mark.slow
def test_a_stopped_and_resumed_two_source_run_trains_on_the_same_batches(tmp_path, two_sources):
    """Two loader workers, stopped at step 4 and resumed: the same keys as one run, and the per-source counts go on."""
    from train import train

    small, large = tmp_path / "small", tmp_path / "large"
    common = [
        "data.train_shards=null",
        f"data.sources={{small: {{shards: {small}, weight: 0.6}}, large: {{shards: {large}, weight: 0.4}}}}",
        "trainer.max_steps=8",
        "trainer.log_every_n_steps=1",
        "callbacks.throughput.window=1",
        "trainer.val_check_interval=1000",
        "data.num_workers=2",
        "data.shuffle_buffer=8",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "export.enabled=false",
    ]

    def run(name, extra):
        log = tmp_path / f"{name}.jsonl"
        recorder = f"+callbacks.recorder={{_target_: tests.conftest.BatchRecorder, path: '{log}'}}"
        result = train(compose_train(tmp_path, [*common, f"paths.output_dir={tmp_path / name}", *extra, recorder]))
        rows = list(csv.DictReader(open(result["output_dir"] / "logs" / "metrics.csv")))
        return [json.loads(line) for line in log.read_text().splitlines()], rows

    straight, straight_rows = run("straight", [])
    first, _ = run("resumed", ["+callbacks.stop={_target_: tests.conftest.StopAtStep, step: 4}"])
    second, resumed_rows = run("resumed", ["resume=auto"])
    assert [r["keys"] for r in second] == [r["keys"] for r in straight]  # the recorder appends to one log
    assert {source_of(k) for r in straight for k in r["keys"]} == {"small", "large"}

    def final(rows, name):
        return [float(r[f"data/samples_{name}"]) for r in rows if r.get(f"data/samples_{name}")][-1]

    assert final(resumed_rows, "small") == final(straight_rows, "small")
    assert final(resumed_rows, "large") == final(straight_rows, "large")


def test_the_config_check_names_a_source_that_matches_nothing_and_a_leftover_train_shards(tmp_path, two_sources):
    from moss.config_checks import validate

    sources = f"data.sources={{small: {{shards: {tmp_path / 'small'}}}, gone: {{shards: {tmp_path / 'nowhere'}}}}}"
    with pytest.raises(ConfigError, match=r"no shards match data.sources.gone.shards="):
        validate(compose_train(tmp_path, ["data.train_shards=null", sources]))
    with pytest.raises(ConfigError, match="set data.train_shards=null beside data.sources"):
        validate(compose_train(tmp_path, [sources]))
    raw = tmp_path / "train.jsonl"
    raw.write_text("")
    with pytest.raises(ConfigError, match="raw.train preprocesses one training set, data.sources mixes several"):
        validate(compose_train(tmp_path, ["data.train_shards=null", sources, f"raw.train=[{raw}]", "codec=tiny"]))


@pytest.mark.slow
def test_the_mixing_benchmark_runs():
    from tests.training.test_throughput import run_benchmark

    result = run_benchmark("mixing.py", "--samples", "200", "--batches", "5", "--repeats", "1", "--budget", "4096")
    assert set(result["rows_per_s"]) == {"one source", "two sources 0.8/0.2"} and result["draw_us_per_sample"] > 0
    assert result["nodes_draw_us_per_sample"] > 0 and result["nodes_resume_exact"] is True
