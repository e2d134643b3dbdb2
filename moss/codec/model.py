"""XYTokenizer: the MOSS-TTSD speech codec (16 kHz audio <-> 8 x 1024 codes at 12.5 frames/s).

Encode: log-mel -> semantic encoder + adapter and acoustic encoder (50 Hz) -> concatenated -> pre-RVQ adapter
-> residual down-convolution (12.5 Hz) -> residual VQ. Decode: codes -> post-RVQ adapter -> up-convolution
(50 Hz) -> acoustic decoder (100 Hz mel) -> Vocos (waveform at 24 or 32 kHz).

Long audio goes through the original's windows: 30 s windows every 20 s, keeping the first 20 s of each
(10 s of look-ahead, hard concatenation). Batches of clips of different lengths are padded with lengths, so
one call encodes many clips; a clip gives the same codes (and samples) batched as alone.

Layout at the API: codes are `[frames, 8]` per clip (time first, as in the training grids).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch import nn

from moss.audio import SAMPLE_RATE
from moss.codec.checkpoint import load_codec_state
from moss.codec.config import XYTokenizerConfig
from moss.codec.features import LogMel
from moss.codec.layers import Adapter, AudioDecoder, AudioEncoder, ResidualDownConv, UpConv
from moss.codec.quantizer import ResidualVQ
from moss.codec.vocos import Vocos

KEEP_SECONDS = 20  # of every 30 s window, the first 20 s are kept (10 s look-ahead)


class XYTokenizer(nn.Module):
    """The XY-Tokenizer codec. Build with `from_pretrained(config_yaml, checkpoint)` or `from_config`."""

    def __init__(self, config: XYTokenizerConfig):
        super().__init__()
        self.config = config
        p = config.params
        fe = p["feature_extractor_kwargs"]
        self.feature_extractor = LogMel(
            fe.get("n_fft", 400),
            config.hop_length,
            fe.get("feature_size", 80),
            config.input_sample_rate,
            config.window_samples,
        )
        self.semantic_encoder = AudioEncoder(**p["semantic_encoder_kwargs"])
        self.semantic_encoder_adapter = Adapter(**p["semantic_encoder_adapter_kwargs"])
        self.acoustic_encoder = AudioEncoder(**p["acoustic_encoder_kwargs"])
        self.pre_rvq_adapter = Adapter(**p["pre_rvq_adapter_kwargs"])
        self.downsample = ResidualDownConv(**p["downsample_kwargs"])
        self.quantizer = ResidualVQ(**p["quantizer_kwargs"])
        self.post_rvq_adapter = Adapter(**p["post_rvq_adapter_kwargs"])
        self.upsample = UpConv(**p["upsample_kwargs"])
        self.acoustic_decoder = AudioDecoder(**p["acoustic_decoder_kwargs"])
        self.enhanced_vocos = Vocos(**p["vocos_kwargs"])

    # ------------------------------------------------------------------ rates
    @property
    def input_sample_rate(self) -> int:
        return self.config.input_sample_rate

    @property
    def output_sample_rate(self) -> int:
        return self.config.output_sample_rate

    @property
    def encoder_downsample_rate(self) -> int:
        return self.config.encoder_downsample_rate

    @property
    def decoder_upsample_rate(self) -> int:
        return self.config.decoder_upsample_rate

    @property
    def nq(self) -> int:
        return self.config.num_quantizers

    @property
    def device(self) -> torch.device:
        return self.quantizer.quantizers[0].codebook.device

    # ------------------------------------------------------------------ one window
    @torch.inference_mode()
    def tokenize(
        self, waveforms: torch.Tensor, lengths: torch.Tensor, full_window: bool = False, longest: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One window (<= 30 s) of a batch: waveforms `[B, N]` at 16 kHz -> codes `[Q, B, T]`, code lengths `[B]`.

        `full_window=True` computes features over the whole 30 s window as the original does (slower, same codes).
        `longest`: `max(lengths)` when the caller knows it on the host (saves a device read).
        """
        mel, mel_lengths = self.feature_extractor(waveforms, lengths, full_window=full_window, longest=longest)
        semantic, sem_lengths = self.semantic_encoder(mel, mel_lengths)
        semantic, _ = self.semantic_encoder_adapter(semantic, sem_lengths)
        acoustic, ac_lengths = self.acoustic_encoder(mel, mel_lengths)
        mixed, mixed_lengths = self.pre_rvq_adapter(torch.cat([semantic, acoustic], dim=1), ac_lengths)
        down, code_lengths = self.downsample(mixed, mixed_lengths)
        _, codes = self.quantizer(down, code_lengths)
        return codes, code_lengths

    @torch.inference_mode()
    def detokenize(self, codes: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """One window (<= 375 frames): codes `[Q, B, T]` -> one waveform per clip (`lengths[b] * up` samples)."""
        x, x_lengths = self.post_rvq_adapter(self.quantizer.decode_codes(codes), lengths)
        x, x_lengths = self.upsample(x, x_lengths)
        mel, mel_lengths = self.acoustic_decoder(x, x_lengths)
        return self.enhanced_vocos(mel, mel_lengths)

    # ------------------------------------------------------------------ public API
    def prepare(self, waveform, sample_rate: int, index: int = 0) -> torch.Tensor:
        """One clip -> mono float32 at 16 kHz `[N]`. Accepts `[N]`, `[C, N]` or `[N, C]` (C <= 8 channels).

        Raises:
            ValueError: empty audio, NaN/inf samples, or more than 2 dimensions (naming the clip index).
        """
        wave = torch.as_tensor(np.asarray(waveform) if not torch.is_tensor(waveform) else waveform).float()
        if wave.ndim == 2:
            channels_first = wave.shape[0] <= 8 and wave.shape[0] < wave.shape[1]
            wave = wave.mean(dim=0 if channels_first else 1)  # down-mix by channel mean, as the original
        if wave.ndim != 1:
            raise ValueError(f"clip {index}: expected audio [samples] or [channels, samples], got {tuple(wave.shape)}")
        if wave.numel() == 0:
            raise ValueError(f"clip {index}: empty audio")
        if not torch.isfinite(wave).all():
            raise ValueError(f"clip {index}: audio contains NaN or infinite samples")
        if sample_rate != self.input_sample_rate:
            wave = torchaudio.functional.resample(wave, sample_rate, self.input_sample_rate)
        return wave

    @torch.inference_mode()
    def encode(
        self,
        waveforms: Sequence,
        sample_rate: int = SAMPLE_RATE,
        batch_size: int = 16,
        dtype: torch.dtype | None = None,
    ) -> list[torch.Tensor]:
        """Encode clips of any length and channel count.

        Args:
            waveforms: clips as tensors or arrays (`[N]`, `[C, N]`, `[N, C]`).
            sample_rate: their sample rate (resampled to 16 kHz inside).
            batch_size: clips per forward call (sorted by length to limit padding).
            dtype: autocast dtype of the transformer stacks (e.g. torch.bfloat16); features and the quantiser
                stay float32. None = float32 throughout (the reference).

        Returns:
            One LongTensor `[N_16k // 1280, 8]` per clip, in input order, on the codec's device.
        """
        clips = [self.prepare(w, sample_rate, i) for i, w in enumerate(waveforms)]
        lengths = [c.numel() for c in clips]
        return self._by_length(clips, lengths, batch_size, dtype, self._encode_batch)

    def _encode_batch(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        # Lengths stay on the host (reading them back from the device would wait for the GPU, clip by clip);
        # the batch crosses to the device in one copy.
        device, window = self.device, self.config.window_samples
        hop = KEEP_SECONDS * self.input_sample_rate
        keep = hop // self.encoder_downsample_rate
        sizes = [c.numel() for c in clips]
        lengths, longest = torch.tensor(sizes).to(device, non_blocking=True), max(sizes)
        padded = torch.zeros(len(clips), longest, pin_memory=device.type == "cuda")
        for b, clip in enumerate(clips):
            padded[b, : sizes[b]] = clip
        padded = padded.to(device, non_blocking=True)
        pieces = []
        for start in range(0, longest, hop):
            chunk_lengths = (lengths - start).clamp(0, window)
            codes, code_lengths = self.tokenize(
                padded[:, start : start + window], chunk_lengths.clamp(min=1), longest=min(longest - start, window)
            )
            frames = torch.zeros(self.nq, len(clips), keep, dtype=torch.long, device=device)
            n = min(keep, codes.shape[2])
            frames[:, :, :n] = codes[:, :, :n] * (torch.arange(n, device=device) < code_lengths[:, None])
            pieces.append(frames)
        codes = torch.cat(pieces, dim=2)
        return [codes[:, b, : n // self.encoder_downsample_rate].T.contiguous() for b, n in enumerate(sizes)]

    @torch.inference_mode()
    def decode(
        self, codes_list: Sequence[torch.Tensor], batch_size: int = 16, dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """Decode code grids `[frames, Q]` (any length) to float32 waveforms `[frames * decoder_upsample_rate]`.

        `dtype` is the autocast dtype of the network (None = float32, the reference); the inverse STFT is float32.

        Raises:
            ValueError: a grid of the wrong shape or with codes outside the codebooks.
        """
        grids = []
        for i, codes in enumerate(codes_list):
            codes = torch.as_tensor(codes).long()
            if codes.ndim != 2 or codes.shape[1] != self.nq:
                raise ValueError(f"clip {i}: expected codes [frames, {self.nq}], got {tuple(codes.shape)}")
            if codes.numel() and (codes.min() < 0 or codes.max() >= self.quantizer.quantizers[0].codebook.shape[0]):
                raise ValueError(f"clip {i}: codes outside [0, {self.quantizer.quantizers[0].codebook.shape[0]})")
            grids.append(codes)
        waves = self._by_length(grids, [g.shape[0] for g in grids], batch_size, dtype, self._decode_batch)
        return [w.float() for w in waves]

    def _by_length(self, items: list, lengths: list[int], batch_size: int, dtype, run) -> list[torch.Tensor]:
        """`run` over batches of items of similar length (longest first, to limit padding), results in input order."""
        order = sorted(range(len(items)), key=lambda i: -lengths[i])
        out: list[torch.Tensor | None] = [None] * len(items)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            for start in range(0, len(order), batch_size):
                group = order[start : start + batch_size]
                for i, result in zip(group, run([items[i] for i in group]), strict=True):
                    out[i] = result
        return out

    def _decode_batch(self, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        device, window = self.device, self.config.window_frames
        keep = KEEP_SECONDS * self.input_sample_rate // self.encoder_downsample_rate
        sizes = [g.shape[0] for g in grids]  # on the host: which clips a window holds is known without the GPU
        lengths = torch.tensor(sizes).to(device, non_blocking=True)
        codes = torch.zeros(self.nq, len(grids), max(1, max(sizes)), dtype=torch.long, device=device)
        for b, grid in enumerate(grids):
            codes[:, b, : grid.shape[0]] = grid.T.to(device)
        waves = [[] for _ in grids]
        for start in range(0, max(sizes), keep):
            chunk_lengths = (lengths - start).clamp(0, window)
            active = [b for b in range(len(grids)) if sizes[b] > start]
            chunk = codes[:, active, start : start + window]
            for b, wave in zip(active, self.detokenize(chunk, chunk_lengths[active]), strict=True):
                waves[b].append(wave[: keep * self.decoder_upsample_rate])
        return [
            torch.cat(w)[: n * self.decoder_upsample_rate] if w else torch.zeros(0, device=device)
            for w, n in zip(waves, sizes, strict=True)
        ]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: XYTokenizerConfig | None = None, seed: int | None = None) -> XYTokenizer:
        """A randomly initialised codec (tests, benchmarks) with usable codebooks. Default: the tiny config."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config or XYTokenizerConfig.tiny())
        with torch.no_grad():
            for stage in model.quantizer.quantizers:
                stage.codebook.normal_(0, 0.5)
                stage.inited.fill_(True)
        return model.eval()

    @classmethod
    def from_pretrained(cls, config_yaml: str | Path, checkpoint: str | Path, device: str = "cpu") -> XYTokenizer:
        """Load the original YAML and `xy_tokenizer.ckpt` (or a safetensors export), strictly.

        Raises:
            FileNotFoundError: missing files.
            ValueError: a checkpoint that is not an XY-Tokenizer state dict or does not match the config.
        """
        model = cls(XYTokenizerConfig.from_yaml(config_yaml))
        load_codec_state(model, Path(checkpoint))
        return model.to(device).eval()


def load_codec(settings, device: str = "cpu") -> XYTokenizer:
    """The codec a `codec` setting group names: the XY-Tokenizer files, or the seeded random tiny codec."""
    if settings.get("tiny"):
        logging.getLogger(__name__).warning("codec=tiny: a RANDOM tiny codec; its audio is noise (for trying only)")
        return XYTokenizer.from_config(seed=int(settings.get("seed", 0))).to(device)
    return XYTokenizer.from_pretrained(settings["config"], settings["checkpoint"], device=device)
