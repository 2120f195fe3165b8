"""Shared helpers for distributed tests; the one test module that imports torch.testing._internal.

Holds the fake process group used by the plan tests (one process that believes it is rank R of W:
collectives return at once and move no data), and store ports for torchrun launches. Must not hold tests.
"""
from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator
from pathlib import Path

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


def listen_ports(count: int) -> list[int]:
    """`count` distinct ports free now, below the kernel's ephemeral range: a port the OS handed out (bind to 0)
    and released can be taken as the source port of any outgoing connection (gloo opens many) before a later
    process group listens on it."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    sockets = []
    try:
        for port in random.sample(range(10_000, ephemeral_low), k=4 * count):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            if len(sockets) == count:
                return [s.getsockname()[1] for s in sockets]
        raise RuntimeError(f"fewer than {count} free ports under {ephemeral_low}")
    finally:
        for s in sockets:
            s.close()
