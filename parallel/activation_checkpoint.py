"""Per-block activation checkpointing: none, full (recompute the whole block), or selective (an
op-level policy that saves attention and every other matmul output and recomputes the rest), on
every `every`-th block. Must not hold compile or sharding.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten._scaled_mm.default}
# Always kept: attention is the costliest op to recompute per byte stored.
SAVED_OPS = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten.max.default,
}


def get_selective_policy():
    """Save attention and every other matmul (the 1st, 3rd, ...), recompute the rest.

    A block runs wq, wk, wv, wo, w1, w3, w2: the outputs of wq, wv, w1 and w2 are kept, the
    recomputed wk, wo and w3 hold a third of the matmul FLOPs. Forward and recompute count
    separately so both passes make the same choices.
    """
    matmuls = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        if op in SAVED_OPS:
            return CheckpointPolicy.MUST_SAVE
        if op in MATMUL_OPS:
            matmuls[ctx.is_recompute] += 1
            if matmuls[ctx.is_recompute] % 2:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def get_selective_contexts():
    return create_selective_checkpoint_contexts(get_selective_policy())


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
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=get_selective_contexts)
        model.layers[name] = wrapped


def get_recompute_flops_per_token(model_cfg, seq_len: int, mode: str, every: int = 1) -> float:
    """FLOPs per token that checkpointing adds by recomputing forward work (for hardware FLOPs utilisation).

    full: the whole forward of each checkpointed block (its matmuls, 2 x weights, and attention's
    QK^T and AV, 4 d seq). selective: the matmuls it does not save, wk, wo and w3
    (2 x (d kv + d^2 + d ffn)); attention is kept.
    """
    if mode == "none":
        return 0.0
    d, kv, ffn = model_cfg.dim, model_cfg.num_kv_heads * model_cfg.head_dim, model_cfg.ffn_dim
    checkpointed = len(range(0, model_cfg.num_layers, every))
    if mode == "full":
        block_weights = 2 * d * d + 2 * d * kv + 3 * d * ffn
        return checkpointed * (2 * block_weights + 4 * d * seq_len)
    return checkpointed * 2 * (d * kv + d * d + d * ffn)
