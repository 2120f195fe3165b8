"""Megatron-style tensor parallelism (+ sequence parallelism) through DTensor's parallelize_module.

Column-parallel q/k/v and gate/up, row-parallel output and down projections, vocab-parallel
embedding and output layer (its logits stay sharded for loss-parallel cross entropy), and with
sequence parallelism the norms run on sequence shards; without it they run whole on every rank,
their weights replicated DTensors. The plan is data keyed by FQN; must not hold data or pipeline
parallelism.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle


class ReplicateParallel(ParallelStyle):
    """Weights as replicated DTensors, plain tensors in and out: every tp rank computes the whole module.

    For the norms without sequence parallelism. Their inputs are already whole on every rank; as
    DTensors their weights join the sharded ones in the same foreach optimizer and clipping kernels,
    which take no mix of plain tensors and DTensors.
    """

    @staticmethod
    def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in module.named_parameters(recurse=False):
            # from_local, not distribute_tensor: no broadcast; materialize() writes the same values on every rank.
            replicated = DTensor.from_local(param, mesh, [Replicate()], run_check=False)
            module.register_parameter(param_name, nn.Parameter(replicated, requires_grad=param.requires_grad))

    @staticmethod
    def _replicate_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    @staticmethod
    def _local_output(module: nn.Module, output, mesh: DeviceMesh):
        return output.to_local() if isinstance(output, DTensor) else output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._replicate_params, self._replicate_inputs,
                                 self._local_output)


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
    norm_style = SequenceParallel if sequence_parallel else ReplicateParallel
    plan["attention_norm"] = norm_style()
    plan["ffn_norm"] = norm_style()
    return plan


def get_top_plan(model: nn.Module, sequence_parallel: bool, loss_parallel: bool) -> dict:
    seq_layout = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq_layout)
    if model.pos_embeddings is not None:  # learned positions: a whole table on every tp rank
        plan["pos_embeddings"] = ReplicateParallel()
    if model.norm is not None:
        plan["norm"] = SequenceParallel() if sequence_parallel else ReplicateParallel()
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
    if sequence_parallel and model.tok_embeddings is None:
        # A later pipeline stage receives the local sequence shard, but the model reads the positions'
        # length off its input: it gets the input as a Shard(1) DTensor (global shape), its first block
        # the local shard back.
        stage_input = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),))
        seq_shard = (Shard(1), None, None, None)
        first_block_input = PrepareModuleInput(input_layouts=seq_shard, desired_input_layouts=seq_shard,
                                               use_local_output=True)
        parallelize_module(model, tp_mesh, stage_input)
        parallelize_module(next(iter(model.layers.values())), tp_mesh, first_block_input)
