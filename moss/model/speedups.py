"""Optional training speed-ups of the decoder, each switchable on its own (`model.speedups.*`).

* `liger`: RMSNorm, RoPE and SwiGLU through Liger's fused Triton kernels on CUDA. The eager Qwen3 versions
  spend ~8 kernels per RMSNorm (a float32 round trip), slice/neg/cat per RoPE and three passes per SwiGLU, all
  memory-bound. Modules are switched by class, in place: parameters, names and checkpoints are unchanged, and a
  CPU tensor still takes the eager code (so a model moved to the CPU keeps working). transformers applies RoPE
  through a module-level function, so that one switch is process-wide: every Qwen3 attention on CUDA then
  takes Liger's RoPE (the same function, to rounding). Liger's RMSNorm backward
  writes into its incoming gradient by default; here it never does (`in_place=False`): the residual stream's
  gradient reaches two branches.
* `compile`: `torch.compile` of every decoder layer (`fullgraph`: a graph break is an error, not a slow
  fallback). Packs have one shape and, with static varlen shapes, one set of attention arguments, so one
  compilation serves a whole run (and one more for validation's no-grad graph).
* `static_varlen`: the varlen attention gets `max_seqlen` = the pack length and `cu_seqlens` padded with
  empty segments to a multiple of this many entries: the arguments no longer change from pack to pack, so
  a compiled layer does not recompile and kernel plans are reused. Implied by `compile`.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

from moss.model.lora import unwrap
from moss.settings import Count, TypedDict, strict


class LigerRMSNorm(Qwen3RMSNorm):
    """Qwen3's RMSNorm (float32 statistics, cast back before the weight) as one Triton kernel on CUDA."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not hidden_states.is_cuda:
            return super().forward(hidden_states)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # offset 0, "llama" casting (Qwen3's own), and never in place (see the module docstring).
        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


class LigerSwiGLUMLP(Qwen3MLP):
    """`down(silu(gate(x)) * up(x))` with the activation and product fused; the three linears stay as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return super().forward(x)
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


_EAGER_ROPE = modeling_qwen3.apply_rotary_pos_emb


def _dispatching_rope(q, k, cos, sin, unsqueeze_dim=1):
    """The Qwen3 RoPE of transformers, through Liger's kernel for CUDA tensors."""
    if q.is_cuda:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return liger_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    return _EAGER_ROPE(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


_SWAPS = {Qwen3RMSNorm: LigerRMSNorm, Qwen3MLP: LigerSwiGLUMLP}


def liger_problem(device_type: str = "cuda") -> str | None:
    """Why Liger's kernels cannot run on `device_type` here (not CUDA, or the package missing), or None."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return "model.speedups.liger=true needs a CUDA device (Liger's kernels are Triton GPU kernels)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "model.speedups.liger=true needs liger-kernel: pip install 'moss-lightning[gpu]' (or liger-kernel)"
    return None


def use_liger(model: nn.Module, on: bool = True) -> int:
    """Switch the Qwen3 RMSNorms and SwiGLU MLPs of `model` to the Liger classes, and RoPE (or all back).

    Returns:
        the number of modules switched.
    """
    swaps = _SWAPS if on else {fused: eager for eager, fused in _SWAPS.items()}
    switched = 0
    for module in model.modules():
        target = swaps.get(type(module))
        if target is LigerSwiGLUMLP and module.config.hidden_act != "silu":
            continue
        if target is not None:
            module.__class__ = target
            switched += 1
    modeling_qwen3.apply_rotary_pos_emb = _dispatching_rope if on else _EAGER_ROPE
    return switched


def compile_layers(model: nn.Module, **options) -> int:
    """`torch.compile` each decoder layer of a `MossTTSD` (or its peft wrapper) in place (`nn.Module.compile`).

    Options go to `torch.compile` (default `fullgraph=True`). Returns the number of layers compiled.
    """
    options = {"fullgraph": True, **options}
    layers = unwrap(model).decoder_layers()
    for layer in layers:
        layer.compile(**options)
    return len(layers)


@strict
class Speedups(TypedDict, total=False):
    """`model.speedups`: the arguments of `apply_speedups` after the model and device."""

    liger: bool
    compile: bool
    static_varlen: bool
    varlen_bucket: Count


def apply_speedups(
    model: nn.Module,
    device_type: str,
    liger: bool = False,
    compile: bool = False,
    static_varlen: bool = False,
    varlen_bucket: int = 64,
) -> nn.Module:
    """Switch on the speed-ups chosen (`model.speedups.*`) for a `MossTTSD` about to train on `device_type`.

    Call it before LoRA is applied or after: the switches keep every child module and parameter name.

    Raises:
        ValueError: Liger off CUDA or not installed.
    """
    if liger:
        if problem := liger_problem(device_type):
            raise ValueError(f"{problem}; set model.speedups.liger=false here")
        use_liger(model)
    if static_varlen or compile:
        model.varlen_bucket = int(varlen_bucket)
    if compile:
        compile_layers(model)
    return model
