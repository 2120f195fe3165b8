"""Per-block statistics every `log.layer_stats` steps, for spotting a layer that diverges.

For each block (the model's `layers` entries "0".."L-1"): gradient norm (before clipping),
parameter norm and update/parameter ratio ||theta_after - theta_before|| / ||theta_before|| over
the optimizer step, and the RMS and max |x| of the block's output over every micro-batch of the
step (so the figures do not depend on the layout's micro-batching). Written to metrics.jsonl as
{"step": S, "layer_stats": {"grad_norm": [...], "param_norm": [...], "update_ratio": [...],
"act_rms": [...], "act_max": [...]}} (trainer/report.py draws it) and to wandb (flattened by MetricsLogger).
A pipeline's first step in a process has no act_* entries: the schedule infers shapes with extra forwards then.

Cost: nothing off a stats step. On one, a copy of the parameters (this rank's shards), a probe
around each block from the step's start to the end of its backward (the block itself is not touched,
so a compiled block does not recompile), two all-reduces and one host sync. Sums are global: each rank adds its local
shards weighted by 1/(number of ranks holding the same values), then one all-reduce over all ranks
covers FSDP/TP shards, replicas and pipeline stages (a block a rank lacks adds zeros).
Must not hold the train loop or the logger.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

STATS = ("grad_norm", "param_norm", "update_ratio", "act_rms", "act_max")
GRAD_SQ, PARAM_SQ, DELTA_SQ, ACT_SQ, ACT_COUNT = range(5)


def _mesh_replicas(tensor: DTensor) -> int:
    """How many ranks of its mesh hold the same values as this rank's local part."""
    mesh = tensor.device_mesh
    return math.prod(mesh.size(d) for d, p in enumerate(tensor.placements) if not p.is_shard())


class _BlockProbe(nn.Module):
    """Stands in a `layers` entry for one step: runs the block, then records its output."""

    def __init__(self, block: nn.Module, record):
        super().__init__()
        self.block = block
        self._record = record

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        self._record(out)
        return out


class LayerStats:
    """Called by the train loop: `begin(step)` before the step's forward, `after_backward()` before
    clipping, `finish()` after the optimizer step. Does nothing unless `step` is a stats step.
    Activations cover every forward between begin and after_backward (all micro-batches)."""

    def __init__(self, every: int, models: list[nn.Module], *, num_layers: int, world_size: int, pp: int,
                 activation_replicas: int, logger, total_steps: int):
        self.every, self.models, self.num_layers = every, models, num_layers
        self.world_size, self.pp, self.activation_replicas = world_size, pp, activation_replicas
        self.logger, self.total_steps = logger, total_steps
        self.step = 0
        self.active, self.probed = False, True

    def _weight(self, tensor: torch.Tensor) -> float:
        """1 / the number of ranks holding the same values as this rank's local part of `tensor`."""
        if isinstance(tensor, DTensor):  # copies within its mesh, times the meshes its pipeline stage holds
            return 1.0 / (_mesh_replicas(tensor) * (self.world_size // (self.pp * tensor.device_mesh.size())))
        return 1.0 / (self.world_size // self.pp)  # whole on every rank of its pipeline stage

    @staticmethod
    def _local(tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, DTensor):
            if any(p.is_partial() for p in tensor.placements):  # pending sums (sequence-parallel norm grads)
                tensor = tensor.redistribute(placements=[Replicate() if p.is_partial() else p for p in tensor.placements])
            return tensor.to_local()
        return tensor

    def _sq(self, tensor: torch.Tensor) -> torch.Tensor:
        local = self._local(tensor.detach())
        return torch.linalg.vector_norm(local, dtype=torch.float32).double() ** 2 * self._weight(tensor)

    def _blocks(self):
        for model in self.models:
            for name in list(model.layers.keys()):
                yield model.layers, name, int(name)

    def begin(self, step: int, *, activations: bool = True) -> None:
        """`step`: the number of the step about to run (1-based). activations=False: no activation statistics this
        step (a pipeline's first step runs extra forwards to infer shapes, on empty inputs after the first stage)."""
        self.active = bool(self.every) and step % self.every == 0
        if not self.active:
            return
        self.step, self.probed = step, activations
        device = next(p for m in self.models for p in m.parameters()).device
        self.sums = torch.zeros(5, self.num_layers, dtype=torch.float64, device=device)
        self.maxes = torch.zeros(self.num_layers, dtype=torch.float32, device=device)
        if not activations:
            return
        for layers, name, index in self._blocks():
            layers[name] = _BlockProbe(layers[name], lambda out, i=index: self._record_activation(i, out))

    @torch.no_grad()
    def _record_activation(self, index: int, out: torch.Tensor) -> None:
        if isinstance(out, DTensor):  # copies only within its mesh: other data-parallel ranks hold other samples
            weight, local = 1.0 / _mesh_replicas(out), out.to_local()
        else:
            weight, local = 1.0 / self.activation_replicas, out
        self.sums[ACT_SQ, index] += torch.linalg.vector_norm(local, dtype=torch.float32).double() ** 2 * weight
        self.sums[ACT_COUNT, index] += local.numel() * weight
        self.maxes[index] = torch.maximum(self.maxes[index], local.abs().amax().float())

    @torch.no_grad()
    def after_backward(self) -> None:
        if not self.active:
            return
        self.before = {}
        for layers, name, index in self._blocks():
            if self.probed:
                layers[name] = layers[name].block  # the activations are in: the probe goes before anything else runs
            for param in layers[name].parameters():
                if param.grad is not None:
                    self.sums[GRAD_SQ, index] += self._sq(param.grad)
                self.sums[PARAM_SQ, index] += self._sq(param)
                self.before[param] = self._local(param.detach()).clone()

    @torch.no_grad()
    def finish(self) -> dict | None:
        """After the optimizer step: reduce, read once, log; returns the stats on a stats step."""
        if not self.active:
            return None
        for layers, name, index in self._blocks():
            for param in layers[name].parameters():
                delta = self._local(param.detach()) - self.before[param]
                delta_sq = torch.linalg.vector_norm(delta, dtype=torch.float32).double() ** 2
                self.sums[DELTA_SQ, index] += delta_sq * self._weight(param)
        self.before, self.active = {}, False
        if self.world_size > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.maxes, op=dist.ReduceOp.MAX)
        sums, maxes = self.sums.tolist(), self.maxes.tolist()  # the one host sync
        grad_sq, param_sq, delta_sq, act_sq, act_count = sums
        stats = {
            "grad_norm": [math.sqrt(x) for x in grad_sq],
            "param_norm": [math.sqrt(x) for x in param_sq],
            "update_ratio": [math.sqrt(d / p) if p else 0.0 for d, p in zip(delta_sq, param_sq)],
        }
        if self.probed:
            stats.update(act_rms=[math.sqrt(s / n) if n else 0.0 for s, n in zip(act_sq, act_count)], act_max=maxes)
        self.logger.log(self.step, self.total_steps, {"layer_stats": stats}, show=False)
        return stats


def build_layer_stats(cfg, models: list[nn.Module], degrees: dict[str, int], world_size: int, logger) -> LayerStats:
    tp = degrees["tp"]
    # Block outputs are whole on every tp rank without sequence parallelism, sequence shards with it.
    replicas = tp if tp > 1 and not cfg.parallel.sequence_parallel else 1
    return LayerStats(cfg.log.layer_stats, models, num_layers=cfg.model.num_layers, world_size=world_size,
                      pp=degrees["pp"], activation_replicas=replicas, logger=logger, total_steps=cfg.train.steps)
