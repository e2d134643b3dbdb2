"""FSDP2 sharding of MossTTSD for Lightning's `ModelParallelStrategy` (full fine-tuning, or LoRA at scale).

Units: every LoRA adapter matrix on its own (so a unit never mixes the float32 adapters with bf16 frozen
weights), every decoder layer, then the root (the 8 embeddings tied to the 8 heads, the final norm), so
tied weights always live in one unit. With LoRA, the frozen weights are sharded too but get no gradients
or optimiser state: memory reflects what is trained (pitfall P9).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moss.model.lora import unwrap


def shard_model(model: nn.Module, mesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply `fully_shard` to `model` (a MossTTSD or its peft wrapper) over `mesh`; returns it."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    moss = unwrap(model)
    for layer in moss.decoder_layers():
        for name, module in layer.named_modules():
            if name.endswith(("lora_A.default", "lora_B.default")):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when parameters are DTensors (FSDP2)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective: every rank must call it; all ranks receive it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    )


def fsdp_strategy(devices="auto", num_nodes: int = 1, save_distributed_checkpoint: bool = True):
    """Lightning's ModelParallelStrategy with every rank on the data-parallel (FSDP) dimension."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif isinstance(devices, (list, tuple)):
        per_node = len(devices)
    else:
        per_node = max(1, torch.cuda.device_count())
    return ModelParallelStrategy(
        data_parallel_size=per_node * int(num_nodes),
        tensor_parallel_size=1,
        save_distributed_checkpoint=save_distributed_checkpoint,
    )


def single_device_strategy(accelerator: str = "auto"):
    """Lightning's `SingleDeviceStrategy` on the first device of `accelerator` (`gpu`/`cuda` -> cuda:0).

    The strategy takes a torch device, not an accelerator name: `device="gpu"` would not build.
    """
    from lightning.pytorch.strategies import SingleDeviceStrategy

    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return SingleDeviceStrategy(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
