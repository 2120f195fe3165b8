"""Megatron-style tensor parallelism (+ sequence parallelism) through DTensor's parallelize_module.

Column-parallel q/k/v and gate/up, row-parallel output and down projections, vocab-parallel
embedding and output layer (its logits stay sharded for loss-parallel cross entropy), and with
sequence parallelism the norms run on sequence shards. The plan is data keyed by FQN; must not
hold data or pipeline parallelism.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def get_block_plan(sequence_parallel: bool) -> dict:
    # Blocks receive (x, rope, attn_bias, kv_cache); only x is sharded.
    seq_layout = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "attention": PrepareModuleInput(
            input_layouts=(seq_layout, None, None, None), desired_input_layouts=(Replicate(), None, None, None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=seq_layout),
        "feed_forward": PrepareModuleInput(input_layouts=(seq_layout,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=seq_layout),
    }
    if sequence_parallel:
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    return plan


def get_top_plan(model: nn.Module, sequence_parallel: bool, loss_parallel: bool) -> dict:
    seq_layout = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq_layout)
    if model.norm is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(
            input_layouts=seq_layout,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool) -> None:
    """Shard `model` (a Transformer or a pipeline stage of one) over `tp_mesh` in place."""
    parallelize_module(model, tp_mesh, get_top_plan(model, sequence_parallel, loss_parallel))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, get_block_plan(sequence_parallel))
