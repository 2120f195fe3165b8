"""Per-block torch.compile: each transformer block compiled alone (fullgraph), in place, so
parameter names do not change; and the fused loss's per-chunk kernel. Must not hold checkpointing
or sharding.
"""
from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, *, output: bool = False) -> None:
    """`output`: compile the output layer too (a float8 one: its casts and scales fuse only compiled)."""
    # Blocks are identical, so one compiled graph is reused by all of them.
    for block in model.layers.values():
        block.compile(fullgraph=True)
    if output and model.output is not None:
        model.output.compile(fullgraph=True)
    if model.output is not None:
        model.loss.compile_kernel()  # the fused loss's per-chunk softmax and gradient as one kernel
