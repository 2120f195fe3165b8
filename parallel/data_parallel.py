"""Data parallelism: DDP (zero=0), DDP + sharded optimizer state (zero=1), FSDP2 (zero=2/3), HSDP.

zero=1 uses torch.distributed.optim.ZeroRedundancyOptimizer: each rank keeps the AdamW state of
its share of the parameters and broadcasts its updated share after the step. zero=2 is
fully_shard(reshard_after_forward=False) (parameters stay gathered between forward and backward),
zero=3 reshards after forward. With dp_replicate > 1, fully_shard on the 2-D
(dp_replicate, dp_shard) mesh is HSDP. Must not hold tensor or pipeline parallelism.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, reshard_after_forward: bool, param_dtype: torch.dtype) -> None:
    """Shard each block as its own unit (its all-gather overlaps the previous block's compute), then the rest."""
    # Gradients are reduced in fp32 whatever the compute dtype.
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    # The root keeps its parameters gathered after forward: backward needs them at once.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp_policy)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    return DistributedDataParallel(model, device_mesh=dp_mesh)


def build_zero1_optimizer(params, dp_mesh: DeviceMesh, optimizer_class: type[torch.optim.Optimizer],
                          **optimizer_kwargs) -> ZeroRedundancyOptimizer:
    return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, process_group=dp_mesh.get_group(),
                                   **optimizer_kwargs)
