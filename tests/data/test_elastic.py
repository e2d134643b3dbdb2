"""Resuming on another reader layout (ranks x loader workers): every sample of the unfinished passes once.

A run read by 4 readers stops, continues on 2, stops, continues on 3: the samples of every pass the readers began
before the last layout took over are trained on exactly once each, as an uninterrupted run trains on them, while
every reader of each layout gets work.
"""

from collections import Counter

import pytest

from moss.data.dataset import ShardStream, expand_shards
from moss.data.examples import ExampleBuilder
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.text import PromptBuilder

PACKED = {"packer": {"budget": 300, "window": 4}, "packs_per_batch": 1}
PADDED = {"batch_size": 2}


@pytest.fixture
def shards(tmp_path):
    write_shards(generate_samples(48, seed=21), tmp_path / "set", prefix="set", max_samples=4)  # 12 shards of 4
    return expand_shards(str(tmp_path / "set"))


@pytest.fixture
def builder(tiny_tokenizer):
    return ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368, max_rows=300)


def read(urls, builder, mode, slot, slots, batches, state=None, elsewhere=None):
    """`batches` micro-batches of reader `slot` of `slots`; returns its (pass, key) pairs and its state."""
    stream = ShardStream(urls, builder, repeat=True, shuffle=True, seed=3, shuffle_buffer=6, **mode)
    stream._slot = lambda: (slot, slots)
    if state is not None:
        stream.load_state_dict(state)
    if elsewhere is not None:
        stream.resume_elsewhere(elsewhere)
    seen, batches_left = [], iter(stream)
    for _ in range(batches):
        batch = next(batches_left)
        assert len(batch.stats.passes) == len(batch.stats.keys)
        seen += zip(batch.stats.passes, batch.stats.keys, strict=True)
    return seen, stream.state_dict()


@pytest.mark.parametrize("mode", [PACKED, PADDED], ids=["packed", "padded"])
def test_four_readers_then_two_then_three_train_on_every_sample_of_each_pass_once(shards, builder, mode):
    uninterrupted = Counter(key for slot in range(4) for _, key in read(shards, builder, mode, slot, 4, 12)[0][:12])
    seen, states = [], []
    for slot, batches in enumerate([2, 5, 1, 3]):  # readers stop at different points of the pass
        got, state = read(shards, builder, mode, slot, 4, batches)
        seen, states = seen + got, states + [state]
    middle = []
    for slot, batches in enumerate([4, 9]):  # one stops inside its share, the other is well into the next pass
        got, state = read(shards, builder, mode, slot, 2, batches, elsewhere=states)
        seen, middle = seen + got, middle + [state]
        assert got, "every reader of the new layout gets work"
    final = []
    for slot in range(3):
        got, state = read(shards, builder, mode, slot, 3, 40, elsewhere=middle)
        seen, final = seen + got, final + [state]
        assert got
    start = {state["reader"]["readers"][0]["epoch"] for state in final}
    assert len(start) == 1 and start.pop() >= 2  # the last layout took over after two passes had begun
    keys = {key for _, key in seen}
    assert len(keys) == 48 and set(uninterrupted) <= keys
    for done in range(2):
        counts = Counter(key for pass_, key in seen if pass_ == done)
        assert counts == Counter(dict.fromkeys(keys, 1)), f"pass {done}: {sorted(counts.items())}"
    later = Counter((pass_, key) for pass_, key in seen if pass_ >= 2)
    assert later and max(later.values()) == 1  # the passes under the last layout: nothing twice


def test_the_same_layout_still_resumes_exactly(shards, builder):
    first, state = read(shards, builder, PACKED, 1, 2, 3)
    rest, _ = read(shards, builder, PACKED, 1, 2, 6, state=state)
    assert first + rest == read(shards, builder, PACKED, 1, 2, 9)[0]


def test_states_of_another_packing_setting_are_refused_by_the_check_exact_resume_uses(shards, builder):
    from moss.errors import ConfigError

    _, packed = read(shards, builder, PACKED, 0, 2, 2)
    with pytest.raises(ConfigError, match="same data.packing setting"):
        read(shards, builder, PADDED, 0, 3, 1, elsewhere=[packed, packed])
    with pytest.raises(ConfigError, match="same data.packing setting"):
        read(shards, builder, PADDED, 0, 2, 1, state=packed)
