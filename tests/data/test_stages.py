"""The stream's stages: what their saved states hold, and resuming at every micro-batch."""

import json

import pytest

from moss.data.dataset import ShardStream, expand_shards
from moss.data.examples import ExampleBuilder
from moss.data.stages import ShardReader, tar_samples
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.text import PromptBuilder

PACKER = {"budget": 512, "window": 16, "min_fill": 0.97}  # leaves samples in the packer, packs in its queue


@pytest.fixture
def builder(tiny_tokenizer):
    return ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368, max_rows=512)


def make(urls, builder, packed, repeat=True, shuffle=True):
    if packed:
        return ShardStream(urls, builder, repeat, shuffle, seed=7, shuffle_buffer=8, packer=PACKER, packs_per_batch=2)
    return ShardStream(urls, builder, repeat, shuffle, seed=7, shuffle_buffer=8, batch_size=3)


def held_keys(stream, urls) -> list[str]:
    """Keys of the samples that the saved stage states hold (buffer, packer, batcher), looked up by location."""
    state = stream.state_dict()
    reader = ShardReader(urls, 0, 1, stream.shuffle, stream.seed, stream.repeat, skips=None, liveness=None)
    keys = {}
    held = {tuple(loc) for name in ("buffer", "packer", "batcher") for loc in _locs(state, name)}
    for source, epoch, pos, index in held:
        assert source == 0  # one shard set: one source
        for i, raw in enumerate(tar_samples(reader.shards(epoch)[pos])):
            if i == index:
                keys[(epoch, pos, index)] = raw["__key__"]
    return sorted(keys.values())


def _locs(state, name):
    stage = state.get(name, {})
    flat = []
    for key in ("buffer", "pending", "out", "group"):
        for item in stage.get(key, []):
            flat.extend(item if item and isinstance(item[0], list) else [item])
    return flat


@pytest.mark.parametrize("packed", [True, False])
def test_every_sample_read_is_either_emitted_or_held_in_a_stage(tiny_shards, builder, packed):
    """At every micro-batch: samples read so far (reader position) = samples emitted + samples the states hold."""
    urls = expand_shards(str(tiny_shards))
    stream = make(urls, builder, packed, repeat=False, shuffle=True)
    order = ShardReader(urls, 0, 1, True, 7, False, skips=None, liveness=None).shards(0)
    per_shard = [[raw["__key__"] for raw in tar_samples(url)] for url in order]
    emitted = []
    for batch in stream:
        emitted += list(batch.stats.keys)
        reader = stream.state_dict()["reader"]["readers"][0]
        if reader["epoch"] > 0:
            read = [k for keys in per_shard for k in keys]
        else:
            read = [k for keys in per_shard[: reader["shard"]] for k in keys]
            read += per_shard[reader["shard"]][: reader["index"]] if reader["shard"] < len(per_shard) else []
        assert sorted(emitted + held_keys(stream, urls)) == sorted(read)
        assert len(set(emitted)) == len(emitted)
    assert sorted(emitted) == sorted(s.key for s in generate_samples(48, seed=3))


@pytest.mark.parametrize("packed", [True, False])
def test_resuming_at_any_micro_batch_continues_exactly(tiny_shards, builder, packed):
    urls = expand_shards(str(tiny_shards))
    reference = make(urls, builder, packed)
    iterator = iter(reference)
    states, batches = [], []
    for _ in range(24):  # two passes and more
        batches.append(next(iterator).stats.keys)
        states.append(json.loads(json.dumps(reference.state_dict())))
    for k in range(0, 21, 2 if packed else 3):
        resumed = make(urls, builder, packed)
        resumed.load_state_dict(states[k])
        again = iter(resumed)
        assert [next(again).stats.keys for _ in range(3)] == batches[k + 1 : k + 4], f"resumed after batch {k}"


def test_a_state_without_stages_is_refused_with_the_reason(tiny_shards, builder):
    """A flat state (a pre-release layout, never in a released checkpoint) is refused, not half-restored."""
    stream = make(expand_shards(str(tiny_shards)), builder, True)
    flat = {"epoch": 0, "shard": 1, "index": 3, "rng": [], "buffer": [], "pending": [], "ages": [], "ready": []}
    with pytest.raises(ValueError, match="has no stages .* pre-release build"):
        stream.load_state_dict({**flat, "skipped": {}})


def test_a_state_from_before_data_sources_is_refused_with_the_reason(tiny_shards, builder):
    stream = make(expand_shards(str(tiny_shards)), builder, True)
    next(iter(stream))
    state = stream.state_dict()
    state["reader"] = state["reader"]["readers"][0]  # the layout before data.sources
    with pytest.raises(ValueError, match="without a source index .* start the run anew"):
        stream.load_state_dict(state)


def test_resuming_with_another_packing_setting_is_refused(tiny_shards, builder):
    urls = expand_shards(str(tiny_shards))
    packed = make(urls, builder, packed=True)
    next(iter(packed))
    padded = make(urls, builder, packed=False)
    padded.load_state_dict(packed.state_dict())
    with pytest.raises(Exception, match="same data.packing setting"):
        next(iter(padded))


def test_a_training_stream_of_only_over_long_samples_stops_with_the_shards_named(tmp_path, builder):
    import numpy as np

    from moss.data.schema import ShardSample

    long = [ShardSample(f"long-{i}", np.zeros((2000, 8), np.int16), "[S1]hello", "test") for i in range(3)]
    write_shards(long, tmp_path, prefix="long", max_samples=3)
    stream = ShardStream(expand_shards(str(tmp_path)), builder, repeat=True, shuffle=False)
    with pytest.raises(RuntimeError, match="found no usable sample .* in 3 passes over its 1 shards"):
        next(iter(stream))
    assert stream.skipped == {"over-long sample": 3}  # counted once, in the first pass
