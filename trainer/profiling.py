"""The profiling window: steps profile.start_step+1 .. profile.start_step+profile.steps, driven by one
`Profiler.step(step)` call per train-loop iteration (and `close` after the loop).

Over the window, as asked by the profile.* keys:
- trace: a torch.profiler chrome trace per rank, <run.dir>/profile/trace_rank{R}.json.gz (open it
  in Perfetto or chrome://tracing);
- memory_snapshot (CUDA only): allocator history recorded from the window's start, dumped to
  <run.dir>/profile/memory_snapshot_rank{R}.pickle at its end (drag it into pytorch.org/memory_viz);
- roofline: the same profiler with record_shapes; each rank analyses its own trace, the per-rank
  step and busy times are gathered with one all_gather_object, and rank 0 writes the report
  (trainer/roofline.py) to <run.dir>/roofline/.
The device is synchronised at the window's two ends only, so the wall time measured between them
covers exactly the window's work. Each step is a "ProfilerStep#N" range; the fused loss runs in a
"loss" range (forward hooks on the model's `loss` module during the window only).
Costs one comparison per step when every switch is off. Must not hold trace analysis or reporting.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from models import flops_per_token
from trainer.roofs import get_roofs
from trainer.trace_analysis import LOSS_RANGE, STEP_RANGE

MEMORY_HISTORY_ENTRIES = 100_000


class Profiler:
    def __init__(self, cfg, env, run_dir: Path, *, logger, models: list[nn.Module] = (), optimizer=None):
        p = cfg.profile
        self.cfg, self.env, self.run_dir, self.logger, self.models = cfg, env, run_dir, logger, list(models)
        self.optimizer = optimizer  # its parameters give the optimizer class's bytes, which the trace lacks
        self.first, self.last = p.start_step + 1, p.start_step + p.steps  # the steps profiled, 1-based
        self.cuda = env.device.type == "cuda"
        self.memory_snapshot = p.memory_snapshot and self.cuda
        if p.memory_snapshot and not self.cuda:
            logger.info("profile.memory_snapshot=true: CUDA only; ignored on cpu")
        self.torch_profile = p.trace or p.roofline
        self.enabled = self.torch_profile or self.memory_snapshot
        self.roofs = None
        if p.roofline and env.is_main:
            # Rank 0 writes the report. Calibrating now, before any activation exists, keeps the
            # calibration's buffers out of the run's peak memory; the other ranks wait in their first collective.
            cache = Path(p.roofs_cache or Path(cfg.data.cache_dir) / "roofs.json")
            self.roofs = get_roofs(env.device, cache, log=logger.info)
        self.prof = None
        self.active = False
        self._range = None
        self._loss_hooks = []
        self._loss_ranges = []

    def step(self, step: int) -> None:
        """Call at the top of each loop iteration with the number of steps done so far."""
        if not self.enabled:
            return
        if not self.active:
            if step == self.first - 1:
                self._begin(step)
            elif step >= self.first:
                self.logger.info(f"profile: the run resumed at step {step}, past the window (steps "
                                 f"{self.first}-{self.last}); nothing profiled")
                self.enabled = False
        elif step == self.last:
            self._finish()
        else:
            self._range.__exit__(None, None, None)
            self._open_range(step + 1)

    def close(self, step: int) -> None:
        """After the loop: ends a window that ends with the run."""
        if self.active:
            self._finish()
        elif self.enabled:
            self.logger.info(f"profile: the run ended at step {step}, before the window (steps {self.first}-{self.last})")
            self.enabled = False

    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.env.device)

    def _open_range(self, step: int) -> None:
        self._range = record_function(f"{STEP_RANGE}{step}")
        self._range.__enter__()

    def _install_loss_ranges(self) -> None:
        def enter(module, args):
            rf = record_function(LOSS_RANGE)
            rf.__enter__()
            self._loss_ranges.append(rf)

        def leave(module, args, output):
            if self._loss_ranges:
                self._loss_ranges.pop().__exit__(None, None, None)

        for model in self.models:
            loss = getattr(model, "loss", None)
            if isinstance(loss, nn.Module):
                self._loss_hooks += [loss.register_forward_pre_hook(enter), loss.register_forward_hook(leave)]

    def _begin(self, step: int) -> None:
        what = [k for k in ("trace", "memory_snapshot", "roofline") if getattr(self.cfg.profile, k)]
        self.logger.info(f"profile: steps {self.first}-{self.last} ({', '.join(what)})")
        self._synchronize()
        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        if self.torch_profile:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=activities, record_shapes=self.cfg.profile.roofline)
            self.prof.start()
            self._install_loss_ranges()
        if self.env.world_size > 1 and dist.is_initialized():
            dist.barrier()  # every rank's window starts together, so per-rank step times compare
            self._synchronize()
        self.active = True
        self._open_range(step + 1)
        self.start_time = time.perf_counter()

    def _finish(self) -> None:
        self._synchronize()
        seconds = time.perf_counter() - self.start_time
        self._range.__exit__(None, None, None)
        for hook in self._loss_hooks:
            hook.remove()
        self._loss_hooks, self.active, self.enabled = [], False, False
        rank = self.env.rank
        profile_dir = self.run_dir / "profile"
        if self.memory_snapshot:
            profile_dir.mkdir(parents=True, exist_ok=True)
            path = profile_dir / f"memory_snapshot_rank{rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.logger.info(f"profile: memory snapshot in {path} (view at pytorch.org/memory_viz)")
        if self.prof is None:
            return
        self.prof.stop()
        if self.cfg.profile.trace:
            profile_dir.mkdir(parents=True, exist_ok=True)
            trace_path = profile_dir / f"trace_rank{rank}.json.gz"
            self.prof.export_chrome_trace(str(trace_path))
            self.logger.info(f"profile: trace in {trace_path} (rank 0's; one per rank)")
        if self.cfg.profile.roofline:
            if self.cfg.profile.trace:
                self._roofline(trace_path, seconds)
            else:
                with tempfile.TemporaryDirectory(prefix="ridgeline_trace_") as temporary:
                    trace_path = Path(temporary) / f"trace_rank{rank}.json"
                    self.prof.export_chrome_trace(str(trace_path))
                    self._roofline(trace_path, seconds)
        self.prof = None

    def _roofline(self, trace_path: Path, seconds: float) -> None:
        from trainer.kernel_costs import get_optimizer_work
        from trainer.roofline import build_report, write_report
        from trainer.trace_analysis import analyze_trace, load_trace

        cfg, env, roofs = self.cfg, self.env, self.roofs
        steps = self.last - self.first + 1
        scales = cfg.optim.grad_clip > 0 and not cfg.optim.compile  # a scaling pass of its own
        work = None if self.optimizer is None else get_optimizer_work(self.optimizer, grad_clip=scales)
        analysis = analyze_trace(load_trace(trace_path), roofs=roofs, optimizer_work=work)
        mine = {"rank": env.rank, "step_ms": seconds / steps * 1e3, "busy_ms": analysis["busy_ms"],
                "idle_ms": analysis["idle_ms"], "exposed_comm_ms": analysis["communication"]["exposed_ms"]}
        ranks = [mine]
        if env.world_size > 1 and dist.is_initialized():
            ranks = [None] * env.world_size
            dist.all_gather_object(ranks, mine)
        if not env.is_main:
            return
        settings = {"device": env.device.type, "recipe": cfg.recipe, "world_size": env.world_size,
                    "precision": cfg.train.precision, "compile": cfg.train.compile,
                    "fused_loss": cfg.train.fused_loss, "optim_fused": cfg.optim.fused,
                    "optim_compile": cfg.optim.compile}
        tokens = cfg.train.global_batch_size * cfg.train.seq_len
        # This rank's share of the model's FLOPs: the layouts split the work evenly (pipeline stages roughly).
        model_flops = flops_per_token(cfg.model, cfg.train.seq_len) * tokens / env.world_size
        report = build_report(analysis, roofs=roofs, settings=settings, measured_step_ms=mine["step_ms"],
                              step_range=(self.first, self.last), model_flops_per_step=model_flops, ranks=ranks)
        for line in write_report(self.run_dir / "roofline", report):
            self.logger.info(line)
