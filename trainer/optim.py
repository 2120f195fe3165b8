"""AdamW with decay/no-decay groups, and the learning-rate schedules (warmup + cosine, WSD, constant).

Must not hold optimizer-state sharding (ZeRO-1 lives in parallel/data_parallel.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig


def get_param_groups(model_parts: list[nn.Module], weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases and embedding tables undecayed."""
    decay, no_decay, seen = [], [], set()
    for part in model_parts:
        for name, param in part.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.ndim < 2 or "embeddings" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model_parts: list[nn.Module], cfg: OptimConfig, device: torch.device,
                    zero1_mesh=None) -> torch.optim.Optimizer:
    """AdamW; with `zero1_mesh` its state is sharded over that mesh (ZeRO-1)."""
    # fused is the fastest kernel on GPU; foreach is the portable choice elsewhere.
    fused = cfg.fused and device.type == "cuda"
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused, foreach=None if fused else True)
    groups = get_param_groups(model_parts, cfg.weight_decay)
    if zero1_mesh is not None:
        from parallel.data_parallel import build_zero1_optimizer

        return build_zero1_optimizer(groups, zero1_mesh, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def get_lr_factor(step: int, *, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of optim.lr for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    progress = min(1.0, (step - cfg.warmup_steps + 1) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: get_lr_factor(step, total_steps=total_steps, cfg=cfg)
    )
