"""Per-block activation checkpointing: none, full (recompute the whole block), or selective
(an op-level policy that saves matmul and attention outputs and recomputes the cheap rest), on
every `every`-th block. Must not hold compile or sharding.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Outputs worth keeping: expensive to recompute and, for matmuls, cheap to store relative to their FLOPs.
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten.max.default,
}


def _save_matmul_and_attention(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str, every: int = 1) -> None:
    """Wrap blocks in place (keyed names unchanged in the ModuleDict; the wrapper's prefix is
    stripped from state dicts by the wrapper itself)."""
    if mode == "none":
        return
    for name, block in model.layers.items():
        if int(name) % every:
            continue
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            context_fn = partial(create_selective_checkpoint_contexts, _save_matmul_and_attention)
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context_fn)
        model.layers[name] = wrapped
