"""The training loop, top to bottom: environment, mesh, model, optimizer, data, checkpoint, loop.

Must not hold parallelism (parallel/), model code (models/), data loading (trainer/data.py) or
config checks (trainer/config.py): this file only wires them together.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models import Transformer, flops_per_token
from trainer.config import Config, ConfigError, to_yaml, validate
from trainer.data import SampleStream, build_data, val_batches
from trainer.env import destroy_process_group, get_env, get_memory_gb, get_peak_tflops, init_process_group
from trainer.metrics import MetricsLogger, format_duration
from trainer.optim import build_lr_scheduler, build_optimizer


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Upcast here, not in the model: the fp32 logits live only inside the loss.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def get_autocast(cfg: Config, device: torch.device):
    """The one place mixed precision is chosen when FSDP does not carry it (single process, DDP)."""
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare_run_dir(cfg: Config, is_main: bool) -> Path:
    run_dir = Path(cfg.run.dir)
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"run.dir={cfg.run.dir!r}: not writable ({exc.strerror})")
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def build_model(cfg: Config, device: torch.device) -> Transformer:
    # Meta first, then materialise and init from the seed: the same weights whatever the layout.
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(cfg.train.seed)
    model.init_buffers(device)
    return model


def train_step(model, batch: torch.Tensor, *, microbatches: int, autocast, device) -> torch.Tensor:
    """Forward/backward over `microbatches` slices of this rank's batch; returns the mean loss (on device)."""
    total = torch.zeros((), device=device)
    for micro in batch.chunk(microbatches):
        micro = micro.to(device, non_blocking=True)
        with autocast:
            logits = model(micro[:, :-1])
        loss = cross_entropy_loss(logits, micro[:, 1:]) / microbatches
        loss.backward()
        total += loss.detach()
    return total


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], *, autocast, device) -> float:
    model.eval()
    losses = []
    for batch in batches:
        batch = batch.to(device)
        with autocast:
            logits = model(batch[:, :-1])
        losses.append(cross_entropy_loss(logits, batch[:, 1:]))
    model.train()
    return torch.stack(losses).mean().item()


def train(cfg: Config) -> dict:
    env = get_env(cfg.run.device)
    validate(cfg, env.world_size)
    run_dir = prepare_run_dir(cfg, env.is_main)
    data = build_data(cfg, run_dir if env.is_main else None, log=print if env.is_main else lambda *_: None)
    init_process_group(env, cfg.parallel.backend)
    torch.manual_seed(cfg.train.seed)
    try:
        return _train(cfg, env, run_dir, data)
    finally:
        destroy_process_group()


def _train(cfg: Config, env, run_dir: Path, data) -> dict:
    t = cfg.train
    logger = MetricsLogger(run_dir, enabled=env.is_main, progress=cfg.log.progress, wandb_mode=cfg.log.wandb,
                           wandb_project=cfg.log.wandb_project)
    model = build_model(cfg, env.device)
    optimizer = build_optimizer([model], cfg.optim, env.device)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, t.steps)
    autocast = get_autocast(cfg, env.device)
    stream = SampleStream(data.train, seed=t.seed)
    val = val_batches(data, t.micro_batch_size, t.val_batches) if t.val_batches else []
    microbatches = t.global_batch_size // t.micro_batch_size
    tokens_per_step = t.global_batch_size * t.seq_len
    step_flops = flops_per_token(cfg.model, t.seq_len) * tokens_per_step
    peak = get_peak_tflops(env.device, cfg.log.peak_tflops)

    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.num_layers} layers, dim {cfg.model.dim}"
                f" | {tokens_per_step:,} tokens/step ({t.global_batch_size} x {t.seq_len}), {microbatches} micro-batches"
                f" | device {env.device}, {t.precision} | run dir {run_dir}")

    step, loss_sum, last_log_time, last_log_step = 0, None, time.perf_counter(), 0
    start_time, last = last_log_time, {}
    while step < t.steps:
        batch = stream.next_batch(t.global_batch_size, 0, 1)
        loss = train_step(model, batch, microbatches=microbatches, autocast=autocast, device=env.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        loss_sum = loss if loss_sum is None else loss_sum + loss

        if step % cfg.log.every == 0 or step == t.steps:
            # The only host sync of the loop: reading the loss and norm at a log step.
            elapsed = time.perf_counter() - last_log_time
            steps_done = step - last_log_step
            tokens_per_s = steps_done * tokens_per_step / elapsed
            last = {
                "loss": (loss_sum / steps_done).item(),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / env.world_size,
                "mfu": step_flops * steps_done / elapsed / (peak * 1e12 * env.world_size) if peak else None,
                "mem_gb": get_memory_gb(env.device),
                "eta_s": (t.steps - step) * elapsed / steps_done,
            }
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"loss is {last['loss']} at step {step}")
            logger.log(step, t.steps, last)
            loss_sum, last_log_time, last_log_step = None, time.perf_counter(), step
        if val and (step % t.val_every == 0 or step == t.steps):
            last["val_loss"] = evaluate(model, val, autocast=autocast, device=env.device)
            logger.info(f"step {step}/{t.steps} | val loss {last['val_loss']:.4f}")
            logger.log(step, t.steps, {"val_loss": last["val_loss"]}, show=False)

    total_time = time.perf_counter() - start_time
    logger.info(f"done: {t.steps} steps in {format_duration(total_time)}, final loss {last.get('loss', float('nan')):.4f}"
                + (f", val loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f" | run dir {run_dir}")
    logger.close()
    return last
