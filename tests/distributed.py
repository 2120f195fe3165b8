"""Shared helpers for distributed tests; the one test module that imports torch.testing._internal.

Holds the fake process group used by the plan tests (one process that believes it is rank R of W:
collectives return at once and move no data). Must not hold tests.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """The default process group as rank `rank` of `world_size`, destroyed on exit whatever happens."""
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
