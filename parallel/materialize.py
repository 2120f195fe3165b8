"""Materialise a (possibly sharded) meta model on its device and initialise it from the seed.

Each parameter gets the value the single-device model would give it (the model's per-name seeded
init on the full shape), then keeps only its local shard: identical weights in every layout.
Must not hold any sharding decision.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def get_clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def materialize(module: nn.Module, model, device: torch.device, seed: int) -> None:
    """`module`: the (wrapped, sharded) module to fill; `model`: the Transformer inside it."""
    module.to_empty(device=device)
    model.tie_weights()
    for name, param in module.named_parameters():
        full = model.initial_value(get_clean_name(name), param.shape, seed, device)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank computed the same full tensor, so slice locally, no broadcast.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
    model.init_buffers(device)
