"""MossTTSDConfig: the MOSS-TTSD architecture, read from either published form of `config.json`.

Two forms exist for the same weights:

* the original (`AsteroidTTSConfig`, OpenMOSS v0.5/v0.7): `"model_type": "qwen3"`, the Qwen3 fields plus
  `channels`, `speech_pad_token`, `speech_vocab_size`, `speech_token_range`;
* the transformers port (`"model_type": "moss_ttsd"`), which adds `speech_eos_token`.

Field names follow upstream verbatim. The Qwen3 part is handed to `transformers.Qwen3Config` untouched, so
nothing about the backbone is restated here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, Strict
from transformers import PretrainedConfig, Qwen3Config

from moss.config_schema import check_values
from moss.errors import ConfigError, first_line
from moss.settings import Positive, Required, TypedDict

# Keys that describe the multichannel wrapper rather than the Qwen3 backbone.
MOSS_KEYS = ("channels", "speech_pad_token", "speech_vocab_size", "speech_token_range", "speech_eos_token")
# model_type values that may carry MOSS-TTSD weights.
ACCEPTED_MODEL_TYPES = ("qwen3", "moss_ttsd", "asteroid_tts", "asteroid")
# Bookkeeping keys of a serialised PretrainedConfig that are not architecture.
_IGNORED_KEYS = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map")

# The real channel-0 id of <|end_of_speech|> (hard-coded in the original `_sample`); ported configs store it.
REAL_SPEECH_EOS = 152694
REAL_SPEECH_OFFSET = 151665


def read_json_object(file: Path) -> dict:
    """A JSON file of a model folder that must hold an object (config, index, adapter, generation settings).

    Raises:
        ConfigError: not readable, not JSON, or not an object; one line naming the file.
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{file} is not a readable JSON file ({first_line(err)}); fix or replace it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _int(least: int, most: int):
    return Annotated[int, Strict(), Field(ge=least, le=most)]  # Strict: true, "8" and 8.0 are not sizes


class ConfigJson(TypedDict, total=False):
    """The `config.json` fields this project reads, with what a real MOSS-TTSD could hold (others pass through).

    The bounds sit well above the real model (2B: 28 layers, hidden 2048, vocab 152,697) and well below what
    would make building the model run out of memory or never finish.
    """

    channels: _int(2, 64)
    speech_vocab_size: _int(2, 1 << 20)
    speech_pad_token: _int(0, 1 << 20)
    speech_token_range: Annotated[list[_int(0, 1 << 24)], Field(min_length=2, max_length=2)]
    speech_eos_token: _int(0, 1 << 24) | None
    vocab_size: Required[_int(1, 1 << 24)]
    hidden_size: Required[_int(1, 1 << 16)]
    num_hidden_layers: Required[_int(1, 1024)]
    num_attention_heads: Required[_int(1, 1024)]
    num_key_value_heads: _int(1, 1024) | None
    head_dim: _int(1, 4096) | None
    intermediate_size: _int(1, 1 << 18)
    max_position_embeddings: _int(1, 1 << 24)
    rms_norm_eps: Positive
    rope_theta: Positive
    pad_token_id: _int(0, 1 << 24) | None
    bos_token_id: _int(0, 1 << 24) | None
    eos_token_id: _int(0, 1 << 24) | list[_int(0, 1 << 24)] | None
    tie_word_embeddings: bool
    hidden_act: str


def config_json_problems(data: dict) -> list[str]:
    """Every field of a config.json outside its type and bounds, and sizes that do not fit together."""
    problems = check_values(data, ConfigJson, "config.json")
    if problems:
        return problems
    heads, kv = data["num_attention_heads"], data.get("num_key_value_heads") or data["num_attention_heads"]
    if heads % kv:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if data.get("head_dim") is None and data["hidden_size"] % heads:
        problems.append(f"hidden_size={data['hidden_size']} is not a multiple of num_attention_heads={heads}")
    vocab = data["vocab_size"]
    for key in ("speech_eos_token", "pad_token_id", "bos_token_id"):
        if isinstance(data.get(key), int) and data[key] >= vocab:
            problems.append(f"{key}={data[key]} is outside vocab_size={vocab}")
    return problems


class MossTTSDConfig(PretrainedConfig):
    """Architecture of MOSS-TTSD: Qwen3 backbone fields plus the multichannel fields.

    A transformers `PretrainedConfig` (`model_type="moss_ttsd"`, registered with `AutoConfig`), serialised flat
    as either published `config.json` form (`to_dict(layout)`), never in transformers' nested default form.

    Attributes:
        channels: number of token channels (8: text/codebook-0 + 7 codebooks).
        speech_vocab_size: rows of the channel 1..C-1 embeddings (1024 codes + pad).
        speech_pad_token: the audio pad code of channels 1..C-1 (1024).
        speech_token_range: half-open [first, last) channel-0 ids of codebook-0 codes (151665, 152689 real).
        speech_eos_token: channel-0 id of `<|end_of_speech|>`; absent from the original config, where it is
            the literal 152694 (tiny configs use `eos_token_id`).
        backbone: every other key, passed to `transformers.Qwen3Config` as is.
    """

    model_type = "moss_ttsd"

    def __init__(
        self,
        channels: int = 8,
        speech_vocab_size: int = 1025,
        speech_pad_token: int = 1024,
        speech_token_range: tuple[int, int] = (REAL_SPEECH_OFFSET, REAL_SPEECH_OFFSET + 1024),
        speech_eos_token: int | None = None,
        backbone: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        # The heads are the channel embeddings, always (the backbone's own tie_word_embeddings is about its
        # unused token table); transformers ties what `_tied_weights_keys` names only when this is true.
        kwargs["tie_word_embeddings"] = True
        super().__init__(**kwargs)
        self.channels, self.speech_vocab_size, self.speech_pad_token = channels, speech_vocab_size, speech_pad_token
        self.speech_token_range = tuple(int(x) for x in speech_token_range)
        self.speech_eos_token = speech_eos_token
        self.backbone = dict(backbone or {})
        self._check()

    def _check(self) -> None:
        problems = []
        if self.channels < 2:
            problems.append(f"channels must be >= 2, got {self.channels}")
        if len(self.speech_token_range) != 2 or self.speech_token_range[1] <= self.speech_token_range[0]:
            problems.append(
                f"speech_token_range must be [first, last) with last > first, got {self.speech_token_range}"
            )
        if not 0 <= self.speech_pad_token < self.speech_vocab_size:
            problems.append(
                f"speech_pad_token {self.speech_pad_token} outside speech_vocab_size {self.speech_vocab_size}"
            )
        vocab = self.backbone.get("vocab_size")
        if vocab is not None and self.speech_token_range[1] > vocab:
            problems.append(f"speech_token_range {self.speech_token_range} exceeds vocab_size {vocab}")
        if problems:
            raise ConfigError("invalid MOSS-TTSD config: " + "; ".join(problems))
        if self.speech_eos_token is None:
            real = self.speech_token_range[0] == REAL_SPEECH_OFFSET
            self.speech_eos_token = REAL_SPEECH_EOS if real else self.backbone.get("eos_token_id")

    def __eq__(self, other) -> bool:
        return isinstance(other, MossTTSDConfig) and self.to_dict("moss_ttsd") == other.to_dict("moss_ttsd")

    __hash__ = None

    # ------------------------------------------------------------------ derived values
    @property
    def vocab_size(self) -> int:
        """Channel-0 vocabulary (text + codebook-0 + control tokens)."""
        return int(self.backbone["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.backbone["hidden_size"])

    @property
    def speech_offset(self) -> int:
        """Channel-0 id of codebook-0 code 0 (151665 in the real vocabulary)."""
        return self.speech_token_range[0]

    @property
    def channel_vocab_sizes(self) -> list[int]:
        """Classes per channel: [vocab_size, speech_vocab_size, ...]."""
        return [self.vocab_size] + [self.speech_vocab_size] * (self.channels - 1)

    @property
    def pad_token_id(self) -> int | None:
        """padding_idx of the channel-0 embedding (the original passes `config.pad_token_id`)."""
        return self.backbone.get("pad_token_id")

    def qwen3_config(self, attn_implementation: str | None = None) -> Qwen3Config:
        """The backbone config, as transformers' Qwen3Model expects it."""
        kwargs = dict(self.backbone)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return Qwen3Config(**kwargs)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", **kwargs: Any) -> MossTTSDConfig:
        """Build from a config.json dict of either published form.

        Raises:
            ConfigError: the dict describes another model (unknown model_type, missing multichannel fields).
        """
        model_type = data.get("model_type")
        if model_type not in ACCEPTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not a MOSS-TTSD config (expected one of "
                f"{ACCEPTED_MODEL_TYPES}); point model.path at a MOSS-TTSD checkpoint such as fnlp/MOSS-TTSD-v0.5"
            )
        if "channels" not in data:
            raise ConfigError(
                f"{source}: a {model_type!r} config without 'channels' is a plain language model, not MOSS-TTSD "
                f"(its config.json needs channels, speech_vocab_size, speech_pad_token, speech_token_range); "
                f"point model.path at a MOSS-TTSD checkpoint"
            )
        if problems := config_json_problems(data):
            raise ConfigError(f"{source} does not describe a model this project can build: " + "; ".join(problems))
        moss = {k: data[k] for k in MOSS_KEYS if k in data and data[k] is not None}
        backbone = {k: v for k, v in data.items() if k not in MOSS_KEYS and k not in _IGNORED_KEYS}
        config = cls(**moss, backbone=backbone)
        return (config, kwargs) if kwargs.pop("return_unused_kwargs", False) else config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MossTTSDConfig:
        """Read `<path>/config.json` (or a config.json file path)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no config.json at {file}; model.path must be a folder holding config.json and the weights "
                f"(e.g. a local copy of fnlp/MOSS-TTSD-v0.5)"
            )
        return cls.from_dict(read_json_object(file), source=str(file))

    def to_dict(self, layout: str = "original") -> dict[str, Any]:
        """Serialise; `layout="original"` is readable by the OpenMOSS loader, `"moss_ttsd"` by the port."""
        if layout not in ("original", "moss_ttsd"):
            raise ValueError(f"layout must be 'original' or 'moss_ttsd', got {layout!r}")
        out = dict(self.backbone)
        moss = {key: getattr(self, key) for key in MOSS_KEYS}
        moss["speech_token_range"] = list(self.speech_token_range)
        if layout == "original":
            out.update(model_type="qwen3", architectures=["AsteroidTTSInstruct"])
            if moss["speech_eos_token"] == REAL_SPEECH_EOS:
                moss.pop("speech_eos_token")  # the original class hard-codes it
        else:
            out.update(model_type="moss_ttsd", architectures=["MossTTSDForCausalLM"])
        out.update(moss)
        return dict(sorted(out.items()))

    def to_json_string(self, use_diff: bool = True, layout: str = "original") -> str:
        return json.dumps(self.to_dict(layout), indent=2) + "\n"

    def save_pretrained(self, out_dir: str | Path, layout: str = "original", **kwargs: Any) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text(json.dumps(self.to_dict(layout), indent=2) + "\n")

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **backbone_overrides: Any) -> MossTTSDConfig:
        """A tiny config with the real channel-0 *layout* (the golden stand-in vocabulary of 1416 ids).

        Text 0..367, pad/eos-of-text 368, codebook-0 codes at 384 + c, control tokens 1408..1415
        (end of speech 1413). Widths are tiny so CPU tests and the built-in default run in seconds.
        """
        backbone = dict(
            vocab_size=1416,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            attention_bias=False,
            tie_word_embeddings=False,
            use_sliding_window=False,
            sliding_window=None,
            bos_token_id=368,
            eos_token_id=1413,
            pad_token_id=368,
            initializer_range=0.02,
        )
        backbone.update(backbone_overrides)
        return cls(speech_token_range=(384, 1408), speech_eos_token=1413, backbone=backbone)

    @classmethod
    def v05(cls) -> MossTTSDConfig:
        """The published fnlp/MOSS-TTSD-v0.5 architecture (Qwen3-1.7B-Base backbone)."""
        backbone = dict(
            vocab_size=152697,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            attention_bias=False,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=28,
            bos_token_id=151643,
            eos_token_id=151643,
            pad_token_id=151643,
            initializer_range=0.02,
        )
        return cls(backbone=backbone)
