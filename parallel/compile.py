"""Per-block torch.compile: each transformer block compiled alone (fullgraph), in place, so
parameter names do not change. Must not hold checkpointing or sharding.
"""
from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    # Blocks are identical, so one compiled graph is reused by all of them.
    for block in model.layers.values():
        block.compile(fullgraph=True)
