"""The gradient norm, and clipping by it, over every shard (DTensor over tp/dp) and every pipeline stage.

Must not hold optimizer logic.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def _group_by_placement(params: list[torch.Tensor]) -> dict[tuple | None, list[torch.Tensor]]:
    # Norms of DTensors sharing a mesh and placements combine in one reduction; plain tensors are whole.
    # Foreach kernels take no mix of plain tensors and DTensors (TP without SP leaves the norms plain),
    # so clipping also runs group by group.
    groups: dict[tuple | None, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, tuple(p.grad.placements)) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    return groups


@torch.no_grad()
def get_grad_norm(params: list[torch.Tensor], pp_mesh: DeviceMesh | None = None) -> torch.Tensor:
    """The global L2 norm of the gradients (a plain tensor, same on every rank); nothing is changed."""
    return _get_total_norm(_group_by_placement(params), pp_mesh)


def _get_total_norm(groups: dict, pp_mesh: DeviceMesh | None) -> torch.Tensor:
    device = next(iter(groups.values()))[0].device if groups else "cpu"
    total_sq = torch.zeros((), device=device)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float() ** 2
    if pp_mesh is not None and pp_mesh.size() > 1:
        dist.all_reduce(total_sq, group=pp_mesh.get_group())
    return total_sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, pp_mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Clip in place; return the global L2 norm (a plain tensor, same on every rank)."""
    groups = _group_by_placement(params)
    total = _get_total_norm(groups, pp_mesh)
    if math.isfinite(max_norm):
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
