"""The training loop, top to bottom: environment, mesh, model, optimizer, data, checkpoint, loop.

Must not hold parallelism (parallel/), model code (models/), data loading (trainer/data.py) or
config checks (trainer/config.py): this file only wires them together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel as loss_parallel_context
from torch.profiler import record_function

from models import count_params, flops_per_token
from parallel import (ParallelModel, build_mesh, build_parallel_model, clip_grad_norm_, get_dp_rank_and_size,
                      get_grad_norm)
from parallel.plan import PlannerCheck
from trainer.checkpoint import CHECKPOINTS, Checkpointer, LoadSource, find_load_source, get_checkpoint_dir
from trainer.config import Config, ConfigError, check_writable, get_micro_batch_size, get_microbatches, to_yaml, validate
from trainer.data import SampleStream, build_data, save_tokenizer, val_batches
from trainer.env import (configure_cuda_allocator, destroy_process_group, get_env, get_memory_gb, get_peak_tflops,
                         init_process_group)
from trainer.faults import FaultHandlers, FaultInjector, NonfiniteGuard
from trainer.layer_stats import build_layer_stats
from trainer.metrics import MetricsLogger, format_duration
from trainer.optim import ClippedAdamW, build_lr_scheduler, build_optimizer, get_stepping_optimizer
from trainer.profiling import Profiler


SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Upcast here, not in the model: the fp32 logits live only inside the loss.
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
    # Under loss_parallel the loss is a replicated DTensor; a plain tensor (differentiable) adds to plain totals.
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def get_model_loss(*, fused: bool, compiled: bool):
    """(model, inputs, targets) -> mean loss: fused with the output layer inside the model, or from its logits."""
    if fused:
        return lambda model, inputs, targets: model(inputs, targets=targets)
    # Compiled, the fp32 upcast fuses into the softmax instead of materialising fp32 logits.
    criterion = torch.compile(cross_entropy_loss) if compiled else cross_entropy_loss
    return lambda model, inputs, targets: criterion(model(inputs), targets)


def get_compute_context(cfg: Config, device: torch.device, *, fsdp: bool):
    """A factory of the context forward and backward run in: mixed precision where FSDP does not
    carry it (one process, DDP, TP or PP without FSDP), and the attention backend asked for."""
    autocast = cfg.train.precision != "fp32" and not fsdp
    backend = SDPA_BACKENDS.get(cfg.train.attention_backend)

    @contextlib.contextmanager
    def context():
        with contextlib.ExitStack() as stack:
            if backend is not None:
                stack.enter_context(sdpa_kernel(backend))
            if autocast:
                stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
            yield

    return context


def prepare_run_dir(cfg: Config, is_main: bool) -> Path:
    """Check that run.dir can be written, without creating it: the trainer creates it once the checkpoint has
    loaded, so a run that fails on its inputs leaves no new folder behind."""
    run_dir = Path(cfg.run.dir)
    if is_main:
        check_writable("run.dir", cfg.run.dir, folder=True)
        checkpoints = run_dir / CHECKPOINTS
        if checkpoints.exists() and not checkpoints.is_dir():
            raise ConfigError(f"run.dir={cfg.run.dir!r}: {checkpoints} is not a folder (checkpoints go there)")
    return run_dir


def train_step(pm: ParallelModel, batch: torch.Tensor, *, accumulation: int, compute_context, device,
               model_loss=get_model_loss(fused=False, compiled=False)) -> torch.Tensor:
    """Forward/backward over this rank's batch in `accumulation` slices; returns the summed mean loss
    (on device; zero on pipeline ranks without the last stage)."""
    total = torch.zeros((), device=device)
    loss_context = loss_parallel_context if pm.loss_parallel else contextlib.nullcontext
    if device.type == "cuda":
        # A copy from pageable memory waits for the GPU to drain the last step; pinned, the host runs ahead.
        batch = batch.pin_memory()
    for index, micro in enumerate(batch.chunk(accumulation)):
        micro = micro.to(device, non_blocking=True)
        inputs, targets = micro[:, :-1], micro[:, 1:]
        last = index == accumulation - 1
        for part in pm.parts:  # reduce gradients only after the last slice
            if pm.uses_fsdp:
                part.set_requires_gradient_sync(last)
            elif pm.uses_ddp:
                # Under a pipeline schedule the stage arms DDP's reduction itself on its last backward; a
                # forward that armed it too (the schedule's shape inference runs one outside no_sync)
                # would reduce twice and break DDP's bucket rebuild.
                part.require_backward_grad_sync = last and pm.schedule is None
        with compute_context(), loss_context():
            if pm.schedule is None:
                loss = model_loss(pm.parts[0], inputs, targets) / accumulation
                loss.backward()
                total += loss.detach()
            else:
                losses = []
                kwargs = {"target": targets, "losses": losses} if pm.is_last_stage else {}
                pm.schedule.step(*([inputs] if pm.is_first_stage else []), **kwargs)
                if losses:
                    total += torch.stack(losses).sum().detach()  # loss_fn already divided by accumulation x microbatches
    return total


@torch.no_grad()
def evaluate(pm: ParallelModel, batches: list[torch.Tensor], *, accumulation: int, compute_context, device,
             model_loss=get_model_loss(fused=False, compiled=False)) -> torch.Tensor:
    """Mean loss over this rank's fixed validation batches (its data-parallel share of the set); zero on
    pipeline ranks without the last stage. A pipeline runs the schedule's forward-only pass."""
    for part in pm.parts:
        part.eval()
    total = torch.zeros((), device=device)
    for batch in batches:
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with compute_context(), (loss_parallel_context() if pm.loss_parallel else contextlib.nullcontext()):
            if pm.schedule is None:
                total += model_loss(pm.parts[0], inputs, targets)
            else:
                losses = []
                kwargs = {"target": targets, "losses": losses} if pm.is_last_stage else {}
                pm.schedule.eval(*([inputs] if pm.is_first_stage else []), **kwargs)
                if losses:  # loss_fn divided each microbatch's loss by accumulation x microbatches
                    total += torch.stack(losses).sum() * accumulation
    for part in pm.parts:
        part.train()
    return total / len(batches)


def train(cfg: Config) -> dict:
    env = get_env(cfg.run.device)
    degrees = validate(cfg, env.world_size)
    configure_cuda_allocator(env)
    run_dir = prepare_run_dir(cfg, env.is_main)
    # A BPE comes from the checkpoint being loaded when it has one: the weights were trained with it.
    source = find_load_source(cfg.checkpoint, run_dir)
    saved_tokenizer = source.path / "tokenizer.json" if source.path is not None else None
    data = build_data(cfg, run_dir, saved_tokenizer=saved_tokenizer, log=print if env.is_main else lambda *_: None)
    # Collectives time out after the step watchdog has had its say (fault.watchdog_s names the rank and step).
    init_process_group(env, cfg.parallel.backend, timeout_s=max(600.0, 2 * cfg.fault.watchdog_s))
    torch.manual_seed(cfg.train.seed)
    try:
        with FaultHandlers(cfg.fault, env) as faults:
            return train_loop(cfg, env, degrees, run_dir, data, source, faults=faults)[0]
    finally:
        destroy_process_group()


def train_loop(cfg: Config, env, degrees: dict[str, int], run_dir: Path, data, source: LoadSource,
               faults: FaultHandlers | None = None) -> tuple[dict, ParallelModel]:
    """Build, then train for train.steps; returns the last logged metrics and the trained model."""
    t = cfg.train
    faults = faults or FaultHandlers(cfg.fault, env, install=False)
    injector = FaultInjector(cfg.fault, env, cfg.model)  # test hooks; checks fault.inject_module first
    logger = MetricsLogger(run_dir, enabled=env.is_main, progress=cfg.log.progress, wandb_mode=cfg.log.wandb,
                           wandb_project=cfg.log.wandb_project, config=dataclasses.asdict(cfg))
    mesh = build_mesh(degrees, env.device.type) if env.world_size > 1 else None
    dp_rank, dp_size = get_dp_rank_and_size(mesh)
    pp_microbatches = get_microbatches(cfg.parallel, degrees["pp"]) if degrees["pp"] > 1 else 1
    # The recipe fixes the global batch; accumulation is whatever the layout leaves over.
    micro_batch_size = get_micro_batch_size(t, dp_size, pp_microbatches)
    accumulation = t.global_batch_size // (dp_size * micro_batch_size * pp_microbatches)
    # Each pipeline microbatch's share of the step's mean loss (the schedule does not rescale gradients).
    loss_fn = lambda logits, targets: cross_entropy_loss(logits, targets) / (accumulation * pp_microbatches)  # noqa: E731
    pm = build_parallel_model(cfg, degrees, mesh, env.device, loss_fn=loss_fn, microbatches=pp_microbatches)
    injector.attach(pm.models)
    params = pm.parameters()
    optimizer = build_optimizer(pm.parts, cfg.optim, env.device,
                                zero1_mesh=mesh["dp_shard"] if cfg.parallel.zero == 1 and dp_size > 1 else None)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, t.steps)
    compute_context = get_compute_context(cfg, env.device, fsdp=pm.uses_fsdp)
    # The fused loss needs the whole output layer and the targets in one forward: not under a pipeline
    # schedule (its loss_fn takes logits) nor tensor parallelism (vocab-sharded logits, loss_parallel).
    fused_loss = t.fused_loss and pm.schedule is None and not pm.loss_parallel
    if t.fused_loss and not fused_loss:
        pm.notes.append("train.fused_loss ignored: pipeline and tensor-parallel layouts compute the loss from logits")
    model_loss = get_model_loss(fused=fused_loss, compiled=t.compile and not pm.loss_parallel)
    stream = SampleStream(data.train, seed=t.seed)
    # A pipeline takes its microbatches' rows in one schedule call. ZBV's forward-only pass fails inside
    # torch.distributed.pipelining (a stage without backward), so that schedule runs no validation.
    validates = t.val_batches and not (degrees["pp"] > 1 and cfg.parallel.pp_schedule == "zbv")
    val = val_batches(data, t.global_batch_size, t.val_batches, micro_batch_size=micro_batch_size * pp_microbatches,
                      dp_rank=dp_rank, dp_size=dp_size) if validates else []
    if t.val_batches and not validates:
        pm.notes.append("validation off: parallel.pp_schedule='zbv' has no forward-only pass; train.val_batches ignored")
    tokens_per_step = t.global_batch_size * t.seq_len
    step_flops = flops_per_token(cfg.model, t.seq_len) * tokens_per_step
    peak = get_peak_tflops(env.device, cfg.log.peak_tflops)

    logger.info(f"model: {count_params(cfg.model) / 1e6:.2f}M parameters, {cfg.model.num_layers} layers, dim {cfg.model.dim}"
                f" | {tokens_per_step:,} tokens/step ({t.global_batch_size} x {t.seq_len}), accumulation {accumulation}"
                f" | {env.world_size} x {env.device.type}, {t.precision} | run dir {run_dir}")
    for note in pm.notes:
        logger.info(note)
    planner = PlannerCheck(cfg, degrees, env.device, log=logger.info)  # predicted memory and step time, logged

    checkpointer = Checkpointer(cfg, run_dir, pm=pm, optimizer=optimizer, scheduler=scheduler, stream=stream,
                                env=env, degrees=degrees, logger=logger)
    checkpointer.before_commit = injector.before_commit

    def rerun(bad_step: int, position: int) -> list[int]:  # a stopped step again, same batch and weights
        injector.begin_step(bad_step)
        batch = SampleStream(data.train, seed=t.seed, position=position).next_batch(t.global_batch_size, dp_rank, dp_size)
        train_step(pm, batch, accumulation=accumulation, compute_context=compute_context, device=env.device,
                   model_loss=model_loss)
        return stream.sample_indices(position, t.global_batch_size)

    guard = NonfiniteGuard(cfg.fault, optimizer, env=env, run_dir=run_dir, model_cfg=cfg.model, models=pm.models,
                           rerun=rerun, log=logger.info)
    step = checkpointer.load(source)
    if env.is_main and step < t.steps:  # only now: a run that fails on its inputs leaves the run dir as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        save_tokenizer(data.tokenizer, run_dir)
        logger.open(step if source.resumes else None)  # a resumed run appends to its metrics.jsonl
    loss_sum, last_log_time, last_log_step = None, time.perf_counter(), step
    window = checkpointer.train_state  # the log window a preempted run left open (empty otherwise)
    holders = env.world_size // degrees["pp"]  # the ranks of the last pipeline stage hold the losses
    start_time, last = last_log_time, {}
    profiler = Profiler(cfg, env, run_dir, logger=logger, models=pm.models, optimizer=optimizer)  # profile.*: nothing when off
    layer_stats = build_layer_stats(cfg, pm.models, degrees, env.world_size, logger)  # log.layer_stats
    first_step = step
    while step < t.steps:
        profiler.step(step)
        # A pipeline's first step here infers shapes with extra forwards: no activation statistics from it.
        layer_stats.begin(step + 1, activations=pm.schedule is None or step > first_step)
        faults.step_started(step + 1)
        injector.begin_step(step + 1)
        position = stream.position
        with record_function("next_batch"):  # named ranges for the profiler; ~free when it is off
            batch = stream.next_batch(t.global_batch_size, dp_rank, dp_size)
        with record_function("train_step"):
            loss = train_step(pm, batch, accumulation=accumulation, compute_context=compute_context, device=env.device,
                              model_loss=model_loss)
        layer_stats.after_backward()
        pp_mesh = mesh["pp"] if mesh is not None else None
        stepper = get_stepping_optimizer(optimizer)
        if isinstance(stepper, ClippedAdamW):  # it clips inside its step
            grad_norm = stepper.grad_norm = get_grad_norm(params, pp_mesh)
        else:
            grad_norm = clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"), pp_mesh)
        if guard.allows_update(step + 1, grad_norm, position):
            with record_function("optimizer.step"):
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        layer_stats.finish()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        loss = guard.masked(loss)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        injector.end_step(step)
        preempted = faults.agree_on_signal()  # one tiny host collective per step (trainer/faults.py)

        # Checkpoint steps are log steps too (a crash resumes at a window's start); a preemption carries its
        # open window in the checkpoint instead.
        if step % cfg.log.every == 0 or step == t.steps or checkpointer.is_due(step):
            # The only host syncs of the loop: reading the loss, norm and non-finite flags at a log step.
            guard.check()
            steps_done = step - last_log_step
            skipped = guard.take_skipped() + window.window_skipped
            trained = steps_done + window.window_trained + window.window_skipped - skipped  # skipped steps excluded
            mean_loss = (get_global_mean(loss_sum, env.world_size, holders=holders) + window.window_loss_sum) / trained \
                if trained else float("nan")
            # Timed after the sync and back to back (logging included), so the rate is what the device did.
            now = time.perf_counter()
            elapsed, last_log_time = now - last_log_time, now
            tokens_per_s = steps_done * tokens_per_step / elapsed
            last = {
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / env.world_size,
                "mfu": step_flops * steps_done / elapsed / (peak * 1e12 * env.world_size) if peak else None,
                "mem_gb": get_memory_gb(env.device),
                "eta_s": (t.steps - step) * elapsed / steps_done,
            }
            if skipped:
                last["skipped_steps"] = skipped
            if trained and not math.isfinite(last["loss"]):
                raise FloatingPointError(f"loss is {last['loss']} at step {step}")
            logger.log(step, t.steps, last)
            planner.maybe_log(step, t.steps, last)
            loss_sum, last_log_step = None, step
            window.window_loss_sum, window.window_trained, window.window_skipped = 0.0, 0, 0
        elif preempted and checkpointer.saving:
            guard.check()
            skipped = guard.take_skipped()
            window.window_loss_sum += get_global_mean(loss_sum, env.world_size, holders=holders) if loss_sum is not None else 0.0
            window.window_trained += step - last_log_step - skipped
            window.window_skipped += skipped
            loss_sum, last_log_step = None, step
        if val and (step % t.val_every == 0 or step == t.steps):
            val_loss = evaluate(pm, val, accumulation=accumulation, compute_context=compute_context, device=env.device,
                                model_loss=model_loss)
            last["val_loss"] = get_global_mean(val_loss, env.world_size, holders=holders)
            logger.info(f"step {step}/{t.steps} | val loss {last['val_loss']:.4f}")
            logger.log(step, t.steps, {"val_loss": last["val_loss"]}, show=False)
        faults.step_finished()
        if preempted or checkpointer.is_due(step):
            guard.check()  # a non-finite state is never saved
        checkpointer.maybe_save(step)
        if preempted:
            if checkpointer.saving and not checkpointer.is_due(step):
                checkpointer.save(step)
            profiler.close(step)
            checkpointer.close()
            saved = f"checkpoint saved to {get_checkpoint_dir(run_dir, step)}" if checkpointer.saving else \
                "checkpoint.enabled=false, nothing saved"
            logger.info(f"preempted by {preempted} at step {step}: {saved}, exiting")
            logger.close()
            return last, pm

    profiler.close(step)
    checkpointer.close()
    total_time = time.perf_counter() - start_time
    result = (f"final loss {last['loss']:.4f}" if "loss" in last else "nothing left to train") + \
        (f", val loss {last['val_loss']:.4f}" if "val_loss" in last else "")
    logger.info(f"done: {t.steps} steps in {format_duration(total_time)}, {result} | run dir {run_dir}")
    logger.close()
    return last, pm


def get_global_mean(value: torch.Tensor, world_size: int, *, holders: int) -> float:
    """Mean of `value` over the ranks that hold it (the others hold zero): a log-step-only collective."""
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value.item() / holders
