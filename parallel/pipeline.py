"""Pipeline parallelism through torch.distributed.pipelining: split the model into stages by FQN,
place stages on pp ranks, and build the schedule (GPipe, 1F1B, interleaved 1F1B, looped BFS,
interleaved zero-bubble, ZBV). Must not hold tensor or data parallelism; the caller applies those
to each stage module with the same function it uses without pipelining.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
SINGLE_STAGE = ("gpipe", "1f1b")


def get_stage_ids(pp_rank: int, pp: int, virtual_stages: int, schedule: str) -> list[int]:
    """Stages this rank runs: looped (rank, rank + pp, ...) or, for ZBV, V-shaped (rank, 2pp-1-rank)."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual_stages)]


def get_stage_layers(num_layers: int, num_stages: int) -> list[list[str]]:
    """Contiguous layer names per stage; earlier stages take the remainder."""
    base, extra = divmod(num_layers, num_stages)
    names, start = [], 0
    for stage in range(num_stages):
        count = base + (1 if stage < extra else 0)
        names.append([str(i) for i in range(start, start + count)])
        start += count
    return names


def split_stage(model: nn.Module, stage_id: int, num_stages: int) -> nn.Module:
    """A copy of the (meta) model holding only this stage's modules; names stay as in the full model."""
    stage = copy.deepcopy(model)
    keep = set(get_stage_layers(len(model.layers), num_stages)[stage_id])
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    if stage_id != 0:
        stage.tok_embeddings = None
        stage.pos_embeddings = None
    if stage_id != num_stages - 1:
        stage.norm = None
        stage.output = None
    return stage


def get_bubble_fraction(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> float:
    """Idle share of a step: (p-1)/(m+p-1) for GPipe/1F1B, (p-1)/(v m + p-1) when interleaved."""
    if schedule in SINGLE_STAGE:
        return (pp - 1) / (microbatches + pp - 1)
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


def build_schedule(stage_modules: list[nn.Module], stage_ids: list[int], *, num_stages: int, pp_mesh: DeviceMesh,
                   device: torch.device, schedule: str, microbatches: int, loss_fn):
    stages = [PipelineStage(module, stage_id, num_stages, device, group=pp_mesh.get_group())
              for module, stage_id in zip(stage_modules, stage_ids)]
    schedule_class = SCHEDULES[schedule]
    # scale_grads=False: the default divides every gradient the stage holds by the microbatch count at
    # the end of each step, including what earlier steps of the same optimizer step accumulated.
    # loss_fn therefore returns each microbatch's share of the step's mean loss.
    if schedule in SINGLE_STAGE:
        return schedule_class(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_class(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
