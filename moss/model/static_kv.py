"""A static KV cache for decoding, read bucket by bucket, and CUDA graphs of the one-row decode step.

transformers' `DynamicCache` grows by one row per step, so every step has new shapes and launches each of
its ~400 kernels from Python: at batch 1 a real-size step is launch-bound (~29 ms for ~1 ms of memory
traffic on an H100). Here the keys and values of every layer live in buffers allocated once for the whole
generation, `[layers, B, H_kv, capacity, D]`; a step writes its rows at a device-side position and attends
over the first `width` columns only, `width` being the filled length rounded up to a bucket. With fixed
shapes per bucket, one CUDA graph per bucket replays the whole step (`DecodeGraphs`).

The cache is an attention implementation (`static_kv`, registered with transformers' `AttentionInterface`,
with no mask function: transformers builds no mask for it). It takes the `StaticKV` as a keyword argument of
the forward pass and needs no transformers cache object, so it does not depend on their cache internals.
Grouped query heads are folded into the query-length axis (`[B, H_kv, G * n, D]`), so keys and values are
never repeated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

logger = logging.getLogger(__name__)
NAME = "static_kv"
DEFAULT_BUCKET = 256


class StaticKV:
    """Keys and values of every layer for `capacity` rows, which columns are real, and where the next rows go.

    Args:
        layers, batch, kv_heads, head_dim: the decoder's shape.
        capacity: rows to hold (prompt + every generated row).
        dtype, device: of the buffers.
        bucket: attended columns are the filled ones rounded up to a multiple of this.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device, bucket):
        self.bucket = int(bucket)
        self.capacity = -(-int(capacity) // self.bucket) * self.bucket
        shape = (layers, batch, kv_heads, self.capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, self.capacity, dtype=torch.bool, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)  # first row this forward pass writes
        self.width = self.bucket  # attended columns (a host int: it selects the graph)
        self._pass: tuple[torch.Tensor, torch.Tensor] | None = None  # (row indices, mask) of the current pass

    @classmethod
    def for_model(cls, model, batch: int, capacity: int, bucket: int = DEFAULT_BUCKET) -> StaticKV:
        """Buffers shaped for `model` (a `MossTTSD`), in its dtype and on its device."""
        config = model.decoder.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        weight = model.lm_heads[0].weight
        return cls(
            config.num_hidden_layers,
            batch,
            config.num_key_value_heads,
            head_dim,
            capacity,
            weight.dtype,
            weight.device,
            bucket,
        )

    def place(self, start: int, rows: int, row_mask: torch.Tensor | None = None) -> None:
        """Make the next forward pass write rows `[start, start + rows)` (`row_mask` `[B, rows]`: which are real)."""
        if start + rows > self.capacity:
            raise ValueError(f"the static KV cache holds {self.capacity} rows; row {start + rows} does not fit")
        self.start.fill_(start)
        self.width = min(self.capacity, -(-(start + rows) // self.bucket) * self.bucket)
        self.valid[:, start : start + rows] = True if row_mask is None else row_mask.bool()

    def _rows_and_mask(self, rows: int, groups: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """This pass's row indices and attention mask `[B, 1, groups * rows, width]` (the same for every layer)."""
        index = self.start + torch.arange(rows, device=device)
        columns = torch.arange(self.width, device=device)
        causal = columns[None, :] <= index[:, None]  # [n, width]
        # A left-pad row sees itself (never an empty row: SDPA would give NaN keys to the cache); real rows never
        # see a pad.
        mask = (self.valid[:, None, : self.width] & causal[None]) | (columns[None, :] == index[:, None])[None]
        batch = mask.shape[0]
        mask = mask[:, None].expand(batch, groups, rows, self.width).reshape(batch, 1, groups * rows, self.width)
        return index, mask

    def attend(self, layer: int, query, key, value, scaling: float | None) -> torch.Tensor:
        """Write this pass's keys/values of `layer`, attend over the bucket. query `[B, H, n, D]` -> `[B, n, H, D]`."""
        batch, heads, rows, dim = query.shape
        kv_heads, width = key.shape[1], self.width
        groups = heads // kv_heads
        if layer == 0:  # built once per pass (inside a captured graph too), read by every later layer
            self._pass = self._rows_and_mask(rows, groups, key.device)
        index, mask = self._pass
        self.keys[layer].index_copy_(2, index, key.to(self.keys.dtype))
        self.values[layer].index_copy_(2, index, value.to(self.values.dtype))
        # Query head h reads key/value head h // groups: fold each group's queries into the row axis.
        folded = query.reshape(batch, kv_heads, groups * rows, dim)
        out = F.scaled_dot_product_attention(
            folded, self.keys[layer, :, :, :width], self.values[layer, :, :, :width], attn_mask=mask, scale=scaling
        )
        return out.reshape(batch, heads, rows, dim).transpose(1, 2)


def static_kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    static_kv: StaticKV | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention interface of transformers: the layer's rows into `static_kv`, attention over its bucket."""
    if static_kv is None or attention_mask is not None:
        raise ValueError("static_kv attention needs the StaticKV as `static_kv=` and no attention mask")
    return static_kv.attend(module.layer_idx, query, key, value, scaling), None


class DecodeGraphs:
    """One CUDA graph per bucket width of a one-row decode step `step() -> outputs` over static inputs.

    `step` must read only tensors that stay in place (the static inputs, `StaticKV`'s buffers) and make no
    host reads. The first call at a new width warms up on a side stream and captures; later calls replay.
    Warm-up runs write the same cache rows the replay writes next, so they leave no trace.
    """

    def __init__(self, kv: StaticKV, step: Callable[[], object]):
        self.kv, self.step = kv, step
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.pool = None
        self.failed: str | None = None  # why capturing failed: the steps then run eagerly, as the static engine

    def __call__(self):
        if self.failed:
            return self.step()
        width = self.kv.width
        if width not in self.graphs:
            try:
                self.graphs[width] = self._capture()
            except RuntimeError as err:  # an operation that cannot be captured: correct rows, eagerly
                self.failed = str(err).splitlines()[0] if str(err) else type(err).__name__
                logger.warning("CUDA graph capture failed (%s); decoding continues without graphs", self.failed)
                return self.step()
        graph, outputs = self.graphs[width]
        graph.replay()
        return outputs

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, object]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.step()
        self.pool = graph.pool()
        return graph, outputs


AttentionInterface.register(NAME, static_kv_attention)
