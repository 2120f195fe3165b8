"""AdamW with decay/no-decay groups, its compiled clipping variant, and the learning-rate schedules
(warmup + cosine, WSD, constant).

Must not hold optimizer-state sharding (ZeRO-1 lives in parallel/data_parallel.py) or the gradient norm
(parallel/grad_norm.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

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


def _adamw_update(p, g, m, v, step, hyper, coef, update) -> None:
    """AdamW on one parameter with its clipped gradient `g * coef`, or nothing where `update` is false; `hyper`
    holds lr, beta1, beta2, eps and weight decay. Compiled, it is one kernel that reads p, g, m, v and writes p, m, v:
    the clipped gradient is never stored. The caller counts `step` up afterwards: written here, the kernel's later
    elements could read the new count."""
    lr, beta1, beta2, eps, weight_decay = hyper.unbind()
    g = g * coef
    new_step = step + 1
    new_m = m.lerp(g, 1 - beta1)
    new_v = v * beta2 + (1 - beta2) * g * g
    denom = new_v.sqrt() / (1 - beta2**new_step).sqrt() + eps
    new_p = p * (1 - lr * weight_decay) - lr / (1 - beta1**new_step) * new_m / denom
    p.copy_(torch.where(update, new_p, p))
    m.copy_(torch.where(update, new_m, m))
    v.copy_(torch.where(update, new_v, v))


# One graph per parameter, its sizes symbolic, serves every shape: compiling the whole parameter list as one graph
# took 80 s for the 1B model on the H200. The hyperparameters are data, not constants: Inductor's cache has reused
# a kernel compiled for another beta2 (pytorch/pytorch#194976, #197889).
_compiled_adamw_update = torch.compile(_adamw_update, dynamic=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    # AdamW is elementwise: each shard steps alone. Detached, a parameter is a plain tensor, whose sizes the
    # compiler keeps symbolic (a Parameter's are static: a recompile per shape). Three graphs serve a Transformer:
    # vectors, square and other matrices.
    return (t.to_local() if isinstance(t, DTensor) else t).detach()


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the gradients inside its step (optim.compile=true): a compiled update per parameter instead
    of a clipping pass that reads and writes every gradient, then the fused kernel. Set `grad_norm` (the global
    norm, parallel.grad_norm.get_grad_norm) before each step; a step without one does not clip. Like the fused
    kernel it takes `found_inf` (the non-finite guard's flag) and then leaves parameters, moments and step counts
    as they were. State and state dicts are AdamW's, loadable both ways; step counts live on the device."""

    def __init__(self, params, *, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.grad_norm: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        self._hyper: dict[int, torch.Tensor] = {}  # per group, on the device: refilled, never re-sent from the host

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "ClippedAdamW takes no closure"
        coef = update = None
        steps = []
        for index, group in enumerate(self.param_groups):
            stepped = [p for p in group["params"] if p.grad is not None]
            if not stepped:
                continue
            device = stepped[0].device
            if coef is None:
                norm = torch.zeros((), device=device) if self.grad_norm is None else self.grad_norm
                coef = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
                update = torch.ones((), dtype=torch.bool, device=device) if self.found_inf is None else self.found_inf == 0
            hyper = self._hyper.setdefault(index, torch.zeros(5, device=device))
            for i, value in enumerate((group["lr"], *group["betas"], group["eps"], group["weight_decay"])):
                hyper[i].fill_(value)  # a new learning rate each step is new data, not a recompile
            for p in stepped:
                state = self.state[p]
                if not state:  # the keys and dtypes torch.optim.AdamW gives its state
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad = p.grad
                if isinstance(p, DTensor) and grad.placements != p.placements:  # tensor parallel's embedding
                    grad = grad.redistribute(p.device_mesh, p.placements)
                _compiled_adamw_update(_local(p), _local(grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                                       state["step"], hyper, coef, update)
                steps.append(state["step"])
        if steps:
            torch._foreach_add_(steps, update.float())
        self.grad_norm = None  # never reused by a later step
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # A plain AdamW's state keeps its step counts on the host; the compiled update reads them on the device.
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def get_stepping_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps this rank's parameters: ZeRO-1's per-partition one, or `optimizer` itself."""
    return getattr(optimizer, "optim", optimizer)  # torch's ZeroRedundancyOptimizer keeps it as `.optim`


def build_optimizer(model_parts: list[nn.Module], cfg: OptimConfig, device: torch.device,
                    zero1_mesh=None) -> torch.optim.Optimizer:
    """AdamW, or with optim.compile the variant that clips inside its step; with `zero1_mesh` its state is
    sharded over that mesh (ZeRO-1)."""
    groups = get_param_groups(model_parts, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.compile:
        optimizer_class, kwargs = ClippedAdamW, dict(kwargs, max_norm=cfg.grad_clip or float("inf"))
    else:
        # fused is the fastest kernel on GPU; foreach is the portable choice elsewhere.
        fused = cfg.fused and device.type == "cuda"
        optimizer_class, kwargs = torch.optim.AdamW, dict(kwargs, fused=fused, foreach=None if fused else True)
    if zero1_mesh is not None:
        from parallel.data_parallel import build_zero1_optimizer

        return build_zero1_optimizer(groups, zero1_mesh, optimizer_class, **kwargs)
    return optimizer_class(groups, **kwargs)


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
