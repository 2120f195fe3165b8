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


def describe_layout(parallel_cfg, degrees: dict[str, int]) -> str:
    """'pp=2 x dp_replicate=1 x dp_shard=2 x tp=2, zero=3, sequence parallel, interleaved_1f1b x2', for logs and
    checkpoint markers: ZeRO only with data parallelism, the schedule only with a pipeline."""
    parts = [" x ".join(f"{axis}={degrees[axis]}" for axis in AXES)]
    if degrees["dp_replicate"] * degrees["dp_shard"] > 1:
        parts.append(f"zero={parallel_cfg.zero}")
    if parallel_cfg.sequence_parallel:
        parts.append("sequence parallel")
    if degrees["pp"] > 1:
        virtual = parallel_cfg.virtual_stages
        parts.append(parallel_cfg.pp_schedule + (f" x{virtual}" if virtual > 1 else ""))
    return ", ".join(parts)
