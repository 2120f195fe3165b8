"""The one DeviceMesh of a run, built once from the validated degrees, and reads of it.

Axes are ("pp", "dp_replicate", "dp_shard", "tp"), outer to inner, so tensor parallelism stays
on neighbouring ranks (inside a node). Must not hold any module transformation.
"""
from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(degrees: dict[str, int], device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, tuple(degrees[a] for a in AXES), mesh_dim_names=AXES)


def get_dp_rank_and_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """This rank's index among the data-parallel replicas, and their count (replicate x shard)."""
    if mesh is None:
        return 0, 1
    shard = mesh["dp_shard"].size()
    return mesh.get_local_rank("dp_replicate") * shard + mesh.get_local_rank("dp_shard"), mesh["dp_replicate"].size() * shard
