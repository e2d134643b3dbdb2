"""Delay pattern: reproduces the original fills (golden/delay) and round-trips for any channels x length."""

import pytest
import torch
from safetensors.torch import load_file

from moss.model.delay import apply_delay_pattern, apply_delay_pattern_labels, last_valid_frame, revert_delay_pattern
from tests.conftest import requires_golden


@requires_golden
def test_matches_original(golden):
    d = load_file(golden / "delay" / "delay.safetensors")
    assert torch.equal(apply_delay_pattern(d["grid"], text_pad_id=368), d["shifting_inputs_out"])
    assert torch.equal(apply_delay_pattern(d["grid"], text_pad_id=368), d["truncate_and_shift_input_ids"])
    assert torch.equal(apply_delay_pattern_labels(d["grid_labels"]), d["truncate_and_shift_labels"])
    assert torch.equal(last_valid_frame(d["find_max_valid_positions_in"]), d["find_max_valid_positions_out"])


@pytest.mark.parametrize("channels", [1, 2, 4, 8])
@pytest.mark.parametrize("length", [0, 1, 5, 33])
def test_round_trip_and_fills(channels, length):
    grid = torch.randint(0, 1000, (2, length, channels))
    delayed = apply_delay_pattern(grid, text_pad_id=-1, speech_pad=-2)
    assert delayed.shape == (2, length + channels - 1, channels)
    assert torch.equal(revert_delay_pattern(delayed), grid)
    for c in range(channels):
        fill = -1 if c == 0 else -2
        assert (delayed[:, :c, c] == fill).all() and (delayed[:, c + length :, c] == fill).all()


def test_last_valid_frame_of_nothing_is_minus_one():
    assert last_valid_frame(torch.zeros(3, 0, 8, dtype=torch.long)).tolist() == [-1, -1, -1]
