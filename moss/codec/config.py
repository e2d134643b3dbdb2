"""XYTokenizerConfig: the codec architecture, read from the original YAML (`generator_params`).

Both published variants load: the 24 kHz `xy_tokenizer_config.yaml` and the 32 kHz
`xy_tokenizer_32k_config.yaml` / `MOSS_TTSD_tokenizer.yaml`. The sample-rate geometry is derived from the
architecture (mel hop x encoder stride x down-sampling = 1280 samples per code frame; up-sampling x decoder
stride x Vocos hop = 1920 or 2560 output samples per code frame) and checked against the YAML when it
states it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moss.audio import SAMPLE_RATE

SECTIONS = (
    "feature_extractor_kwargs",
    "semantic_encoder_kwargs",
    "semantic_encoder_adapter_kwargs",
    "acoustic_encoder_kwargs",
    "pre_rvq_adapter_kwargs",
    "downsample_kwargs",
    "quantizer_kwargs",
    "post_rvq_adapter_kwargs",
    "upsample_kwargs",
    "acoustic_decoder_kwargs",
    "vocos_kwargs",
)


@dataclass
class XYTokenizerConfig:
    """The `generator_params` mapping of the original YAML, with derived rates."""

    params: dict[str, Any]

    def __post_init__(self) -> None:
        missing = [s for s in SECTIONS if s not in self.params]
        if missing:
            raise ValueError(f"codec config lacks the sections {missing} (expected the XY-Tokenizer generator_params)")
        derived_down = self.hop_length * self.params["acoustic_encoder_kwargs"].get("stride_size", 2) * self.avg_pooler
        derived_up = (
            self.params["upsample_kwargs"].get("stride", 4)
            * self.params["acoustic_decoder_kwargs"].get("stride_size", 2)
            * self.params["vocos_kwargs"]["hop_size"]
        )
        for key, derived in (("encoder_downsample_rate", derived_down), ("decoder_upsample_rate", derived_up)):
            stated = self.params.get(key)
            if stated is not None and int(stated) != derived:
                raise ValueError(f"codec config states {key}={stated} but its layers give {derived}")
        self.encoder_downsample_rate, self.decoder_upsample_rate = derived_down, derived_up

    @property
    def input_sample_rate(self) -> int:
        return int(self.params.get("input_sample_rate", SAMPLE_RATE))

    @property
    def output_sample_rate(self) -> int:
        return int(self.params["output_sample_rate"])

    @property
    def hop_length(self) -> int:
        return int(self.params["feature_extractor_kwargs"].get("hop_length", 160))

    @property
    def avg_pooler(self) -> int:
        return int(self.params["downsample_kwargs"].get("avg_pooler", 4))

    @property
    def num_quantizers(self) -> int:
        return int(self.params["quantizer_kwargs"]["num_quantizers"])

    @property
    def window_samples(self) -> int:
        """Input samples per encoder window (30 s)."""
        fe = self.params["feature_extractor_kwargs"]
        return int(fe.get("n_samples", fe.get("chunk_length", 30) * self.input_sample_rate))

    @property
    def window_frames(self) -> int:
        """Code frames per window (375 for 30 s)."""
        return self.window_samples // self.encoder_downsample_rate

    @classmethod
    def from_yaml(cls, path: str | Path) -> XYTokenizerConfig:
        """Read the original YAML (top key `generator_params`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"codec config {path} does not exist; pass the XY-Tokenizer YAML")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or "generator_params" not in data:
            raise ValueError(f"{path} has no 'generator_params': not an XY-Tokenizer config")
        return cls(data["generator_params"])

    @classmethod
    def tiny(cls, output_sample_rate: int = 32000) -> XYTokenizerConfig:
        """Real rates and frame geometry with tiny widths (for tests; the golden tiny codec's layout)."""
        return cls.sized(8, 2, 16, 1, 1, 8, 8, 16, 2, output_sample_rate)

    @classmethod
    def real(cls, output_sample_rate: int = 32000) -> XYTokenizerConfig:
        """The published architecture (widths of xy_tokenizer_32k_config.yaml / the 24 kHz variant)."""
        return cls.sized(768, 12, 3072, 12, 4, 512, 512, 4096, 30, output_sample_rate)

    @classmethod
    def sized(
        cls,
        d_model: int,
        heads: int,
        ffn: int,
        layers: int,
        adapter_layers: int,
        rvq_dim: int,
        vocos_dim: int,
        vocos_intermediate: int,
        vocos_layers: int,
        output_sample_rate: int = 32000,
    ):
        """The XY-Tokenizer layout with the given widths and depths (24 or 32 kHz output)."""
        hop = {32000: 320, 24000: 240}[output_sample_rate]
        enc = dict(
            num_mel_bins=80,
            sampling_rate=SAMPLE_RATE,
            hop_length=160,
            stride_size=2,
            kernel_size=3,
            d_model=d_model,
            scale_embedding=False,
            max_audio_seconds=30,
            encoder_layers=layers,
            encoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            activation_function="gelu",
        )
        adapter = dict(
            input_dim=d_model,
            output_dim=d_model,
            d_model=d_model,
            max_source_positions=1500,
            encoder_layers=adapter_layers,
            encoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
        )
        dec = {k: v for k, v in enc.items() if not k.startswith("encoder_")}
        dec.update(decoder_layers=layers, decoder_attention_heads=heads, decoder_ffn_dim=ffn)
        wide = 4 * d_model
        return cls(
            dict(
                input_sample_rate=SAMPLE_RATE,
                output_sample_rate=output_sample_rate,
                feature_extractor_kwargs=dict(
                    chunk_length=30,
                    feature_size=80,
                    hop_length=160,
                    n_fft=400,
                    n_samples=30 * SAMPLE_RATE,
                    sampling_rate=SAMPLE_RATE,
                ),
                semantic_encoder_kwargs=enc,
                semantic_encoder_adapter_kwargs=adapter,
                acoustic_encoder_kwargs=dict(enc),
                pre_rvq_adapter_kwargs={**adapter, "input_dim": 2 * d_model},
                downsample_kwargs=dict(d_model=d_model, avg_pooler=4),
                quantizer_kwargs=dict(
                    input_dim=wide,
                    rvq_dim=rvq_dim,
                    output_dim=wide,
                    num_quantizers=8,
                    codebook_size=1024,
                    codebook_dim=rvq_dim,
                ),
                post_rvq_adapter_kwargs={**adapter, "input_dim": wide, "output_dim": wide, "max_source_positions": 375},
                upsample_kwargs=dict(d_model=d_model, stride=4),
                acoustic_decoder_kwargs=dec,
                vocos_kwargs=dict(
                    input_channels=80,
                    dim=vocos_dim,
                    intermediate_dim=vocos_intermediate,
                    num_layers=vocos_layers,
                    n_fft=hop * 4,
                    hop_size=hop,
                    padding="same",
                ),
            )
        )
