"""MossTTSD: 8 summed channel embeddings -> transformers `Qwen3Model` -> 8 heads tied to the embeddings.

Module names mirror the original `AsteroidTTSInstruct` so that checkpoints load key for key:
`model.embedding_list.{c}`, `model.language_model.*` (a stock Qwen3Model), `lm_heads.{c}`.

Layout everywhere: `input_ids`, `labels` `[B, T, C]` with `C = config.channels = 8`; channel 0 holds a text
token or (codebook-0 code + speech offset), channels 1..7 codebooks 1..7 (1024 = audio pad); labels use -100.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, DynamicCache, PreTrainedModel, Qwen3Model
from transformers.initialization import no_init_weights

from moss.errors import ConfigError, first_line
from moss.model import varlen
from moss.model.activation_checkpointing import checkpoint_kwargs, checkpointing_policy
from moss.model.attention import AttnImplementation, check_attn_implementation
from moss.model.backbone import MossTTSDBackbone, MossTTSDOutput
from moss.model.config import MossTTSDConfig
from moss.model.folder import (
    WEIGHT_FILES,
    read_generation_config,
    stored_shapes,
    usual_permissions,
    weight_files,
    write_generation_config,
)
from moss.model.loss import (
    DEFAULT_CHUNK_ROWS,
    channel_cross_entropy,
    check_ce_impl,
    normalized_weights,
    weighted_loss,
)

# transformers renamed `past_key_values` to `cache` (5.2x); both the keyword and the output attribute follow it.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen3Model.forward).parameters else "past_key_values"
# Parameters a checkpoint may lack: the unused Qwen3 token table (we keep a zero table) and the tied heads.
OPTIONAL_PREFIXES = ("model.language_model.embed_tokens.",)
TIED_PREFIX = "lm_heads."


class MossTTSD(PreTrainedModel):
    """MOSS-TTSD language model with tied multichannel heads and a chunked per-channel loss.

    A transformers `PreTrainedModel` (registered with `AutoModel` for `model_type="moss_ttsd"`), with the
    original's key layout.
    """

    config_class = MossTTSDConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer"]
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True
    # Each head is its channel's embedding (transformers pairs the matches of both patterns in sorted order).
    _tied_weights_keys = {r"lm_heads\.\d+\.weight": r"model\.embedding_list\.\d+\.weight"}
    # The Qwen3 token table is never used (inputs arrive as summed channel embeddings); checkpoints may omit it.
    _keys_to_ignore_on_load_missing = [r"model\.language_model\.embed_tokens\."]

    def __init__(
        self,
        config: MossTTSDConfig,
        attn_implementation: str | None = None,
        channel_weights: Sequence[float] | None = None,
        ce_chunk_rows: int = DEFAULT_CHUNK_ROWS,
        ce_impl: str = "fused",
    ):
        super().__init__(config)
        # transformers' loader passes the implementation on the config, a direct call as an argument
        attn_implementation = attn_implementation or config._attn_implementation_internal or "sdpa"
        self.model = MossTTSDBackbone(config, attn_implementation)
        self.lm_heads = nn.ModuleList(nn.Linear(config.hidden_size, v, bias=False) for v in config.channel_vocab_sizes)
        self._init_embeddings()
        self.tie_weights()
        for module in (*self.model.embedding_list, *self.lm_heads):
            module._is_hf_initialized = True  # initialised above (and tied): transformers' init leaves them
        self.post_init()
        self.ce_chunk_rows = ce_chunk_rows
        self.ce_impl = check_ce_impl(ce_impl)
        self.set_channel_weights(channel_weights if channel_weights is not None else [1.0] * config.channels)
        # The folder's generation_config.json as read (the original's sampling form); `moss.generation` parses it.
        self.generation_config: dict | None = None
        # > 0: packed boundaries padded to a multiple of this many segments, max_seqlen = the pack length
        # (`moss.model.speedups`: one attention signature for every pack).
        self.varlen_bucket = 0

    # ------------------------------------------------------------------ structure
    def _init_embeddings(self) -> None:
        # Same scale as transformers' init of the backbone (the original runs post_init over all modules);
        # nn.Embedding's N(0, 1) default would swamp the 0.02-scaled residual stream of a fresh model.
        std = float(self.config.backbone.get("initializer_range", 0.02))
        for emb in self.model.embedding_list:
            nn.init.normal_(emb.weight, std=std)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()

    def tie_weights(self, *args, **kwargs) -> None:
        """Heads share the input embeddings, unconditionally, as in the original."""
        for head, emb in zip(self.lm_heads, self.model.embedding_list, strict=True):
            head.weight = emb.weight
        if hasattr(self, "all_tied_weights_keys"):  # after post_init: transformers' bookkeeping (loading reports)
            super().tie_weights(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        """Channel 0's table (text and codebook-0 tokens); channels 1..7 have their own (`model.embedding_list`)."""
        return self.model.embedding_list[0]

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embedding_list[0] = value
        self.tie_weights()

    def set_channel_weights(self, weights: Sequence[float]) -> None:
        """Loss weights per channel; normalised to sum 1 (original default [1]*8, fine-tuning [8,2,1,...])."""
        if len(weights) != self.config.channels:
            raise ValueError(f"expected {self.config.channels} channel weights, got {len(weights)}: {list(weights)}")
        self.channel_weights = [float(w) for w in weights]
        self._normalized_weights = normalized_weights(self.channel_weights)

    @property
    def decoder(self) -> Qwen3Model:
        """The Qwen3 decoder stack (`model.language_model`, the original's key path)."""
        return self.model.language_model

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.decoder.layers)

    def freeze_unused_token_table(self) -> None:
        """The Qwen3 token table is never used (inputs arrive as summed channel embeddings): no gradient for it."""
        self.decoder.embed_tokens.requires_grad_(False)

    def new_cache(self) -> DynamicCache:
        """An empty transformers KV cache for this decoder."""
        return DynamicCache(config=self.decoder.config)

    @property
    def attn_implementation(self) -> str:
        return self.decoder.config._attn_implementation

    def set_attn_implementation(self, name: str) -> None:
        """Switch the attention implementation in place (e.g. varlen_sdpa for packed training, sdpa to generate)."""
        self.decoder.set_attn_implementation(check_attn_implementation(name))

    @contextmanager
    def attention(self, name: str) -> Iterator[None]:
        """Run the block with attention implementation `name` (also internal ones, e.g. `static_kv`), then restore."""
        before = self.attn_implementation
        self.decoder.set_attn_implementation(name)
        try:
            yield
        finally:
            self.decoder.set_attn_implementation(before)

    def gradient_checkpointing_enable(self, policy: bool | str = "full") -> None:
        """Non-reentrant activation checkpointing of every decoder layer (safe with DDP + LoRA).

        `policy`: `full` (or True) recomputes each layer's forward; `selective` keeps matmul and attention
        outputs and recomputes only pointwise work (`moss.model.activation_checkpointing`).
        """
        lm = self.decoder
        kwargs = checkpoint_kwargs(checkpointing_policy(policy) or "full")
        if hasattr(lm, "activation_checkpointing_enable"):  # the transformers 5.2x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def enable_input_require_grads(self) -> None:
        """Nothing to do: checkpointing here is non-reentrant, which needs no input that requires grad.

        peft calls this for frozen bases; making the embeddings' output require grad would cost backward work.
        """

    def gradient_checkpointing_disable(self) -> None:
        """Turn activation checkpointing off again."""
        lm = self.decoder
        (getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable)()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        label_counts: torch.Tensor | Sequence[int] | None = None,
        output_logits: bool | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        use_cache: bool = False,
        cache=None,
        static_kv=None,
    ) -> MossTTSDOutput:
        """Run the model.

        Args:
            input_ids: `[B, T, C]` token grid (delayed).
            attention_mask: `[B, T]` 1 = real row, for padded batches. Leave None for packed rows: a mask
                would make packed samples attend to each other.
            position_ids: `[B, T]`; restart at 0 per packed sample.
            labels: `[B, T, C]`, -100 = ignore; shifted internally (row t predicts label t+1).
            cu_seqlens: packed sample boundaries, int32 offsets over the `B * T` rows as if the B rows were one
                sequence (the packing collator's `cu_seqlens`). Keep it on the host: the model copies it to the
                device once per call, and reads a host copy where a kernel needs one, without a device sync.
                Each segment attends only to itself, in every attention implementation.
            max_seqlen: longest segment of `cu_seqlens` (computed from a host `cu_seqlens` when omitted).
            label_counts: valid shifted labels per channel `[C]`, on the host (the collators count them): the
                loss then selects valid rows without a device sync per channel.
            output_logits: return the C logit tensors; defaults to `labels is None`.
            logits_to_keep: with logits, compute them for the last `logits_to_keep` positions only (0 = all);
                generation needs the last one.
            output_hidden_states: return per-layer hidden states.
            use_cache: keep a KV cache (generation only; packed training must not use one).
            cache: a previous KV cache.
            static_kv: a `moss.model.static_kv.StaticKV` (with the `static_kv` attention implementation): the
                preallocated cache of `moss.generation`'s static and CUDA-graph decoding.
        """
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        batch, length = input_ids.shape[:2]
        attention = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, "static_kv": static_kv}
        inputs = (input_ids, attention_mask, position_ids)
        out = self._backbone(*inputs, use_cache, cache, output_hidden_states, **attention)
        hidden = out.last_hidden_state.reshape(batch, length, -1)
        states = None
        if output_hidden_states:
            states = tuple(h.reshape(batch, length, -1) for h in out.hidden_states)
        result = MossTTSDOutput(
            hidden_states=states,
            cache=getattr(out, _CACHE_KWARG, None) if use_cache else None,
            last_hidden_state=hidden,
        )
        if labels is not None:
            ce = channel_cross_entropy(
                hidden,
                [h.weight for h in self.lm_heads],
                labels,
                self.ce_chunk_rows,
                label_counts=label_counts,
                impl=self.ce_impl,
            )
            result.loss, result.channel_losses = weighted_loss(ce.sums, ce.counts, self._normalized_weights)
            result.channel_loss_sums, result.channel_label_counts = ce.sums, ce.counts
        if output_logits if output_logits is not None else labels is None:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            result.logits = tuple(head(kept) for head in self.lm_heads)
        return result

    def _backbone(self, input_ids, attention_mask, position_ids, use_cache, cache, output_hidden_states, **attention):
        """The summed channel embeddings through the Qwen3 decoder; packed batches as one flattened row."""
        attn, cu_seqlens, static_kv = self.attn_implementation, attention["cu_seqlens"], attention["static_kv"]
        packed = cu_seqlens is not None
        if (packed or attn == varlen.NAME) and (attention_mask is not None or use_cache):
            raise ValueError(
                "packed batches (cu_seqlens) and varlen_sdpa attention take no attention mask and no KV cache "
                "(either would let samples attend to each other); use attn_implementation=sdpa for padded batches "
                "and generation"
            )
        batch, length = input_ids.shape[:2]
        embeds = self.model.embed(input_ids)
        kwargs = {_CACHE_KWARG: cache} if cache is not None else {}
        if static_kv is not None:
            kwargs["static_kv"] = static_kv
        if packed:
            # One flattened row: transformers isolates segments from restarting position_ids only at batch 1,
            # and varlen kernels take offsets over all rows.
            embeds = embeds.reshape(1, batch * length, -1)
            if position_ids is None:
                raise ValueError("packed batches need position_ids restarting at 0 for every sample")
            position_ids = position_ids.reshape(1, batch * length)
            max_seqlen, bucket = attention["max_seqlen"], self.varlen_bucket
            kwargs.update(varlen.boundary_kwargs(attn, cu_seqlens, max_seqlen, length, bucket, embeds.device))
        return self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_config(
        cls,
        config: MossTTSDConfig | dict | None = None,
        *,
        dtype: torch.dtype | str = torch.float32,
        attn_implementation: AttnImplementation = "sdpa",
        seed: int | None = None,
        **kwargs,
    ) -> MossTTSD:
        """A randomly initialised model (tests, the tiny default). `config=None` gives `MossTTSDConfig.tiny()`."""
        if config is None:
            config = MossTTSDConfig.tiny()
        elif isinstance(config, dict):
            config = MossTTSDConfig.from_dict(dict(config), source="model.config")
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config, attn_implementation=attn_implementation, **kwargs)
        return model.to(_as_dtype(dtype))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *args,
        dtype: torch.dtype | str = torch.float32,
        attn_implementation: AttnImplementation = "sdpa",
        device: str | torch.device = "cpu",
        config: MossTTSDConfig | None = None,
        **kwargs,
    ) -> MossTTSD:
        """Load a checkpoint folder of the original or the port layout (safetensors, sharded, or .bin).

        transformers' loader reads the weights (`.bin` with `weights_only`, shards, meta init, dtype); this adds
        the original's `config.json` form, which transformers takes for a plain Qwen3 (`model_type: qwen3`),
        refuses weights that leave parameters unset or name ones the model lacks, and reads the folder's
        `generation_config.json` in the original's sampling form. `config` (default: read from
        `path/config.json`) lets a caller that already parsed it pass it in.

        Raises:
            FileNotFoundError: no config.json or no weights in `path`.
            ConfigError: config.json of another model, or unreadable weights.
            KeyError: weights with missing or unexpected parameters.
            ValueError: weights of the wrong shape.
        """
        path = Path(path)
        config = config if config is not None else MossTTSDConfig.from_pretrained(path)
        check_attn_implementation(attn_implementation)
        kwargs.pop("name_or_path", None)  # AutoModel's, already the path
        model = checked_load(
            super().from_pretrained,
            path,
            *args,
            config=config,
            dtype=_as_dtype(dtype),
            attn_implementation=attn_implementation,
            device_map=torch.device(device),
            **kwargs,
        )
        model.generation_config = read_generation_config(path)
        return model

    @classmethod
    def empty(cls, config: MossTTSDConfig, *, attn_implementation: str = "sdpa", device="cpu", **kwargs) -> MossTTSD:
        """A model with allocated but uninitialised weights (to be loaded), built without a random init pass."""
        check_attn_implementation(attn_implementation)
        with no_init_weights(), torch.device(device):  # transformers' own: the init functions do nothing
            model = cls(config, attn_implementation=attn_implementation, **kwargs)
        model.tie_weights()
        return model

    def save_pretrained(
        self,
        out_dir: str | Path,
        layout: str = "original",
        max_shard_size: int = 5 * 2**30,
        generation_config: dict | None = None,
    ) -> None:
        """Write config.json (`layout`), safetensors (original key layout) and generation_config.json.

        transformers writes the weights (shards above `max_shard_size` bytes with an index, an earlier export's
        shards removed, the tied heads left out); the config is then written in the requested published form.
        The generation config written is `generation_config`, else the model's own (none when both are None).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in WEIGHT_FILES:  # a .bin export of the same folder would be read before the new weights
            (out_dir / stale).unlink(missing_ok=True)
        super().save_pretrained(out_dir, max_shard_size=max_shard_size)
        self.config.save_pretrained(out_dir, layout=layout)
        usual_permissions(*weight_files(out_dir))
        write_generation_config(out_dir, generation_config if generation_config is not None else self.generation_config)


def checked_load(load, path: Path, *args, **kwargs) -> torch.nn.Module:
    """`load(path, ...)` (transformers' `from_pretrained`) with this project's checks around it.

    transformers warns about missing, unexpected or misshapen weights and initialises what is missing at random;
    a MOSS-TTSD folder missing a parameter (other than the unused token table) is the wrong folder, so each of
    those is an error here, naming the parameters, as is a weights file that does not open.
    """
    shapes = stored_shapes(path)  # no weights: names what the folder holds; a file that does not open: names it
    stored = set(shapes)
    if kwargs.get("config") is not None and (problems := shape_problems(kwargs["config"], shapes)):
        raise ConfigError(f"{path}: config.json does not match the weights: " + "; ".join(problems))
    try:  # misshapen weights come back in the loading info, to be refused below with their names
        model, info = load(path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever transformers raises, the user gets one line
        raise ConfigError(f"{path}: the weights do not load ({first_line(err)})") from None
    if mismatched := sorted(info.get("mismatched_keys") or ()):
        shapes = [f"{key}: checkpoint {tuple(saved)} vs model {tuple(made)}" for key, saved, made in mismatched]
        raise ValueError(
            f"{path}: tensors of the wrong shape (config.json does not match the weights): {shapes[:4]}"
            f"{'...' if len(shapes) > 4 else ''} ({len(shapes)})"
        )
    missing = [k for k in info["missing_keys"] if not k.startswith((*OPTIONAL_PREFIXES, TIED_PREFIX))]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(TIED_PREFIX)]
    if missing or unexpected:
        raise KeyError(
            f"{path} does not match the MOSS-TTSD layout: missing {missing[:8]}{'...' if len(missing) > 8 else ''} "
            f"({len(missing)}), unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    if not any(k.startswith(OPTIONAL_PREFIXES) for k in stored):
        with torch.no_grad():
            model.decoder.embed_tokens.weight.zero_()  # never read: zero rather than random, as a re-save writes it
    return model


def shape_problems(config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Where config.json's sizes disagree with the stored weights, before a model of that size is built.

    A config.json claiming 1000 layers over weights of 28 made the loader build 1000 layers and initialise the
    missing ones at random: minutes to hours, and then a refusal. The layer count is compared first (no model
    needed), then every stored shape with the model the config describes, built on the meta device (no memory).
    """
    layers = {int(m.group(1)) for key in shapes if (m := re.search(r"\.layers\.(\d+)\.", key))}
    if layers and len(layers) != config.backbone.get("num_hidden_layers"):
        return [
            f"num_hidden_layers={config.backbone.get('num_hidden_layers')}, but the weights hold {len(layers)} layers"
        ]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MossTTSD(config).state_dict().items()}
    wrong = [
        f"{k}: weights {shapes[k]} vs config {expected[k]}"
        for k in sorted(shapes)
        if k in expected and shapes[k] != expected[k]
    ]
    if not wrong:
        return []
    more = "; ..." if len(wrong) > 3 else ""
    return [f"{len(wrong)} tensors do not have the shapes config.json gives ({'; '.join(wrong[:3])}{more})"]


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


AutoConfig.register(MossTTSDConfig.model_type, MossTTSDConfig)
AutoModel.register(MossTTSDConfig, MossTTSD)
