"""Prompt-augmented decoding (v0.7): window arithmetic against a codec whose frames decode independently."""

import pytest
import torch

from moss.codec.prompt_decode import CROSSFADE_SECONDS, decode_with_prompt, kept_frames


class FrameCodec:
    """A stand-in codec: frame t decodes to `up` samples equal to its channel-0 code, whatever surrounds it;
    encoding gives code 0 everywhere. Any window placed or kept wrongly shows in the output."""

    input_sample_rate, output_sample_rate, encoder_downsample_rate = 16000, 32000, 1280
    device = torch.device("cpu")
    up = 2560  # 32 kHz / 12.5 frames/s

    def __init__(self):
        self.windows = []

    def encode(self, waves):
        return [torch.zeros(w.numel() // self.encoder_downsample_rate, 8, dtype=torch.long) for w in waves]

    def detokenize(self, codes, lengths):
        self.windows.append(codes.shape[-1])
        return [codes[0, 0].float().repeat_interleave(self.up)]


def codes_of(frames):
    codes = torch.zeros(frames, 8, dtype=torch.long)
    codes[:, 0] = torch.arange(1, frames + 1)
    return codes


@pytest.mark.parametrize("frames", [1, 30, 85, 100, 105, 126, 170, 190, 250, 301, 1000])
def test_every_frame_lands_once_in_place(frames):
    codec = FrameCodec()
    wave = decode_with_prompt(codec, codes_of(frames), torch.zeros(3 * 16000))
    expected = torch.arange(1, frames + 1).float().repeat_interleave(codec.up)
    torch.testing.assert_close(wave, expected)
    # Every window is the 20 s prompt (250 frames) plus at most 10 s (125 frames) of generated codes.
    assert max(codec.windows) <= 375 and min(codec.windows) > 250
    assert len(codec.windows) == -(-frames // 85)


@pytest.mark.parametrize("frames, lost_frames", [(106, 1), (115, 1.25), (125, 1.25), (191, 1), (210, 1.25)])
def test_a_window_reaching_the_end_106_to_125_frames_before_it_costs_one_fade_as_in_the_original(frames, lost_frames):
    """Its kept part is not extended, so the next (last) segment's fade-in overlaps kept audio: the output is
    shorter by the fade (0.1 s = 1.25 frames), or by the whole last segment when that is shorter."""
    codec = FrameCodec()
    wave = decode_with_prompt(codec, codes_of(frames), torch.zeros(16000))
    assert CROSSFADE_SECONDS * codec.output_sample_rate == 1.25 * codec.up
    assert wave.numel() == (frames - lost_frames) * codec.up


def test_kept_frames():
    assert kept_frames(0, 125, 1000) == (0, 105)
    assert kept_frames(85, 125, 1000) == (20, 105)
    assert kept_frames(935, 65, 1000) == (20, 65)  # the last window keeps to the end
    assert kept_frames(850, 125, 1000) == (20, 105)  # 150 frames before the end: not yet the last


def test_the_tiny_codec_decodes_behind_a_prompt():
    from moss.codec import XYTokenizer, XYTokenizerConfig

    codec = XYTokenizer.from_config(XYTokenizerConfig.tiny(), seed=0)
    codes = torch.randint(0, 1024, (140, 8))
    wave = decode_with_prompt(codec, codes, 0.1 * torch.randn(5 * 16000))
    assert wave.dtype == torch.float32 and torch.isfinite(wave).all()
    assert wave.numel() == 140 * codec.decoder_upsample_rate
