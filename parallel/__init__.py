"""Parallelism applied from outside the model, in one documented order.

build_parallel_model: build on meta -> split into pipeline stages by FQN (pp > 1) -> for each
stage `parallelize`: tensor/sequence parallel, activation checkpointing, compile, then
FSDP/HSDP -> materialise and initialise from the seed -> DDP (it needs real parameters) ->
pipeline schedule.
One concern per file: mesh.py, tensor_parallel.py, activation_checkpoint.py, compile.py,
data_parallel.py, pipeline.py, materialize.py, grad_norm.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from models import Transformer
from parallel.activation_checkpoint import apply_ac
from parallel.compile import apply_compile
from parallel.data_parallel import apply_ddp, apply_fsdp
from parallel.float8 import apply_float8, describe_converted
from parallel.grad_norm import clip_grad_norm_, get_grad_norm
from parallel.materialize import materialize
from parallel.mesh import AXES, build_mesh, describe_layout, get_dp_rank_and_size
from parallel.pipeline import build_schedule, get_bubble_fraction, get_stage_ids, split_stage
from parallel.tensor_parallel import apply_tp

__all__ = ["ParallelModel", "build_parallel_model", "build_mesh", "clip_grad_norm_", "get_dp_rank_and_size", "get_grad_norm", "AXES"]


@dataclass
class ParallelModel:
    """What the train loop needs: this rank's modules and how to run them."""

    parts: list[nn.Module]  # modules holding this rank's parameters (one per pipeline stage it runs)
    models: list[Transformer]  # the Transformer inside each part (unwrapped)
    schedule: object | None = None  # the pipeline schedule when pp > 1
    is_first_stage: bool = True
    is_last_stage: bool = True
    uses_fsdp: bool = False
    uses_ddp: bool = False
    loss_parallel: bool = False
    notes: list[str] = field(default_factory=list)  # what was applied, for the run log

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]


def get_data_parallel_mode(cfg, degrees: dict[str, int]) -> str:
    """'none', 'ddp' (zero 0/1) or 'fsdp' (zero 2/3; HSDP when dp_replicate > 1)."""
    if degrees["dp_replicate"] * degrees["dp_shard"] == 1:
        return "none"
    return "ddp" if cfg.parallel.zero in (0, 1) else "fsdp"


def parallelize(model: nn.Module, mesh: DeviceMesh | None, cfg, degrees: dict[str, int],
                notes: list[str] | None = None) -> nn.Module:
    """TP/SP, then activation checkpointing, then compile, then FSDP/HSDP; in place, on meta.

    The order matters: TP turns parameters into DTensors that FSDP then shards on the dp axes;
    checkpointing and compile wrap the TP'd block, and FSDP's hooks sit outside both. DDP is not
    applied here: it checks shapes across ranks and builds its buckets when it wraps, so
    build_parallel_model wraps the materialised stage.
    """
    if cfg.train.precision == "fp8":
        # Before TP: torchao's float8 linears have their own tensor-parallel styles upstream; here TP
        # and fp8 together are refused by validation.
        all_gather = get_data_parallel_mode(cfg, degrees) == "fsdp" and cfg.train.fp8_all_gather
        converted = apply_float8(model, recipe=cfg.train.fp8_recipe, fsdp_all_gather=all_gather,
                                 output=cfg.train.fp8_output, fast_accum=cfg.train.fp8_fast_accum)
        all_gather = all_gather and cfg.train.fp8_recipe == "tensorwise"
        notes.append(f"fp8 ({cfg.train.fp8_recipe}{', float8 FSDP all-gather' if all_gather else ''}"
                     f"{', fast accumulation in backward' if cfg.train.fp8_fast_accum else ''}): "
                     f"{len(converted)} linears converted: {describe_converted(converted)}; the rest stay bf16")
    if degrees["tp"] > 1:
        apply_tp(model, mesh["tp"], sequence_parallel=cfg.parallel.sequence_parallel, loss_parallel=True)
    apply_ac(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile:
        apply_compile(model, output=cfg.train.fp8_output)
    mode = get_data_parallel_mode(cfg, degrees)
    if mode == "fsdp":
        dp_mesh = mesh["dp_replicate", "dp_shard"] if degrees["dp_replicate"] > 1 else mesh["dp_shard"]
        param_dtype = torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16
        apply_fsdp(model, dp_mesh, reshard_after_forward=cfg.parallel.zero == 3, param_dtype=param_dtype)
    return model


def build_parallel_model(cfg, degrees: dict[str, int], mesh: DeviceMesh | None, device: torch.device,
                         loss_fn=None, microbatches: int = 1) -> ParallelModel:
    with torch.device("meta"):
        full = Transformer(cfg.model)
    mode = get_data_parallel_mode(cfg, degrees)
    pp = degrees["pp"]
    result = ParallelModel(parts=[], models=[], uses_ddp=mode == "ddp", uses_fsdp=mode == "fsdp",
                           loss_parallel=degrees["tp"] > 1)
    if pp == 1:
        stage_ids, num_stages, models = [0], 1, [full]
    else:
        num_stages = pp * cfg.parallel.virtual_stages
        stage_ids = get_stage_ids(mesh.get_local_rank("pp"), pp, cfg.parallel.virtual_stages, cfg.parallel.pp_schedule)
        models = [split_stage(full, s, num_stages) for s in stage_ids]
    for stage_model in models:
        part = parallelize(stage_model, mesh, cfg, degrees, result.notes)
        materialize(part, stage_model, device, cfg.train.seed)
        if mode == "ddp":
            # zero=0 replicates over dp_replicate; zero=1 over dp_shard, where the optimizer state is sharded.
            part = apply_ddp(part, mesh["dp_replicate" if cfg.parallel.zero == 0 else "dp_shard"])
        result.parts.append(part)
        result.models.append(stage_model)
    if pp > 1:
        result.is_first_stage = 0 in stage_ids
        result.is_last_stage = num_stages - 1 in stage_ids
        result.schedule = build_schedule(result.parts, stage_ids, num_stages=num_stages, pp_mesh=mesh["pp"],
                                         device=device, schedule=cfg.parallel.pp_schedule,
                                         microbatches=microbatches, loss_fn=loss_fn)
        bubble = get_bubble_fraction(cfg.parallel.pp_schedule, pp, microbatches, cfg.parallel.virtual_stages)
        layers = {s: list(m.layers.keys()) for s, m in zip(stage_ids, models)}
        result.notes.append(f"pipeline: {cfg.parallel.pp_schedule}, {num_stages} stages over pp={pp}, "
                            f"{microbatches} microbatches, bubble {100 * bubble:.1f}% | this rank's stages {layers}")
    result.notes.append(f"layout: {describe_layout(cfg.parallel, degrees)}, data parallel: {mode}")
    return result
