"""A step loader's saved position: the same reader layout continues exactly, another shares out the rest.

The streams' states are read out of torchdata's saved `StatefulDataLoader` (with and without worker processes),
so this also pins the layout of that state.
"""

from collections import Counter

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from moss.data.dataset import ShardStream, expand_shards
from moss.data.examples import ExampleBuilder
from moss.data.loader import StepLoader
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.errors import ConfigError
from moss.text import PromptBuilder


@pytest.fixture
def stream(tmp_path, tiny_tokenizer):
    write_shards(generate_samples(24, seed=8), tmp_path / "set", prefix="set", max_samples=4)  # 6 shards
    builder = ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368)
    urls = expand_shards(str(tmp_path / "set"))
    return lambda: ShardStream(urls, builder, repeat=True, shuffle=True, seed=2, shuffle_buffer=4, batch_size=2)


def loader(stream, workers: int) -> StepLoader:
    inner = StatefulDataLoader(stream(), batch_size=None, num_workers=workers, collate_fn=lambda batch: batch)
    return StepLoader(inner, accumulate=1, steps=100)


def pairs(steps, count: int) -> list[tuple[int, str]]:
    out = []
    for _ in range(count):
        stats = next(steps).micro[0].stats
        out += zip(stats.passes, stats.keys, strict=True)
    return out


def test_a_position_saved_by_two_workers_continues_on_one_process_each_sample_once(stream, caplog):
    saved = loader(stream, 2)
    steps = iter(saved)
    before = pairs(steps, 3)
    state = saved.state_dict()
    assert state["ranks"][0]["workers"] == 2
    saved.close()
    again = loader(stream, 2)  # the same layout: exactly what the first would have gone on with
    again.load_state_dict(state)
    reference = pairs(iter(again), 12)
    again.close()
    other = loader(stream, 0)
    other.load_state_dict(state)
    assert "1 ranks x 2 loader workers, this run has 1 x 0" in caplog.text
    after = pairs(iter(other), 30)
    first = Counter(key for pass_, key in before + after if pass_ == 0)
    assert sorted(first.values()) == [1] * 24  # the first pass: every sample once, none lost, none twice
    assert {key for _, key in before + reference if _ == 0} <= set(first)


def test_a_loader_state_of_another_torchdata_layout_is_refused_by_name(stream):
    saved = loader(stream, 2)
    steps = iter(saved)
    pairs(steps, 1)
    state = saved.state_dict()
    saved.close()
    state["ranks"][0]["loader"] = {"snapshot": state["ranks"][0]["loader"]["_snapshot"]}  # a renamed key
    other = loader(stream, 0)
    with pytest.raises(ConfigError, match="not in the layout this build reads .*same number of ranks"):
        other.load_state_dict(state)
