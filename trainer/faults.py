"""Surviving faults: preemption signals, the hang watchdog, non-finite steps, and fault injection for tests.

- `FaultHandlers` (one per run, entered after the process group exists): SIGTERM and SIGUSR1 set a flag;
  every rank calls `agree_on_signal` once per step, a one-int MAX all_reduce on a CPU (gloo) group (about
  0.2 ms measured on 2 busy CPU cores, and no device sync), so a signal that reaches ranks at different times
  still stops all of them after the same step. It also runs the watchdog: a daemon thread that ends the process
  (exit 1, one line naming the rank and step) when a step, collectives included, runs past fault.watchdog_s.
- `NonfiniteGuard`: a step whose global gradient norm is not finite is skipped (fault.nonfinite=skip, at most
  fault.max_skips in a row) or stops the run (stop). The norm is the one signal: it is the same on every rank, and
  a non-finite loss always reaches it (NaN/inf logits give NaN gradients through the softmax). Where the optimizer
  is fused (the CUDA default) or ClippedAdamW (optim.compile), the skip happens on the device through its
  `found_inf` input, as under AMP's GradScaler, and the flags are read only where the loop syncs already (log
  steps, and before a checkpoint save): no sync per step. Other optimizers (foreach, the CPU default) read one scalar per step, which is free on
  CPU and one device sync per step on a GPU. On stop, the step is re-run once on the same batch and weights
  (updates stop at the first step the policy refuses) with forward hooks armed, and <run.dir>/nonfinite.json
  names the first module whose output went non-finite and the batch's sample indices.
- `FaultInjector`: the fault.inject* test hooks (NaN from a module, SIGKILL after a step or inside a save, a hang).

Must not hold checkpoint I/O (trainer/checkpoint.py) or the loop itself (trainer/train.py).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.materialize import get_clean_name
from trainer.config import ConfigError, FaultConfig
from trainer.env import Env
from trainer.optim import ClippedAdamW, get_stepping_optimizer

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
WATCHDOG_EXIT_CODE = 1


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite step; the message is one line naming the step and the first module."""


# ---------------------------------------------------------------------------------------------
# Module paths as in the single-device model.


def get_module_order(model_cfg) -> list[str]:
    """Every module path of the full model, children before their parent, the model itself ("") last: for this
    decoder the order in which forward outputs appear, across pipeline stages too."""
    from models import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    order: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            visit(child, f"{path}.")
            if not isinstance(child, nn.ModuleDict):  # a ModuleDict is never called, so never has an output
                order.append(path)

    visit(model, "")
    return order + [""]


def _is_finite(output) -> bool:
    if isinstance(output, DTensor):
        output = output.to_local()  # this rank's shard; the ranks' answers are combined afterwards
    if isinstance(output, torch.Tensor):
        return not output.is_floating_point() or bool(torch.isfinite(output).all())
    if isinstance(output, (tuple, list)):
        return all(_is_finite(item) for item in output)
    return True


# ---------------------------------------------------------------------------------------------
# Preemption signals and the hang watchdog.


class Watchdog:
    """A daemon thread: a step that has run longer than `timeout_s` ends the process with one line on stderr
    naming the rank and the step, then the main thread's stack."""

    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self._beat: tuple[int, float] | None = None  # (step, start time) while a step runs; one atomic assignment
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ridgeline-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def step_started(self, step: int) -> None:
        self._beat = (step, time.monotonic())

    def step_finished(self) -> None:
        self._beat = None

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.timeout_s / 4)):
            beat = self._beat
            if beat is None or time.monotonic() - beat[1] <= self.timeout_s:
                continue
            step, started = beat
            frame = sys._current_frames().get(threading.main_thread().ident)
            where = "".join(traceback.format_stack(frame)[-8:]) if frame is not None else ""
            sys.stderr.write(f"watchdog: rank {self.rank} stuck in step {step} for {time.monotonic() - started:.1f} s"
                             f" (fault.watchdog_s={self.timeout_s:g}): ending the run\n"
                             f"main thread of rank {self.rank} was at:\n{where}")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(WATCHDOG_EXIT_CODE)  # the main thread is stuck: no unwinding, no teardown


class FaultHandlers:
    """Preemption signals and the watchdog for one run; a context manager entered after the process group exists.

    With install=False (a loop driven by a test harness off the CLI) nothing is installed and no signal is ever
    agreed on, so the loop runs no extra collective.
    """

    def __init__(self, cfg: FaultConfig, env: Env, *, install: bool = True):
        self.env = env
        self.install = install and threading.current_thread() is threading.main_thread()
        self.received = 0  # the last preemption signal's number
        self._previous: dict[int, object] = {}
        self._group = None
        self.watchdog = Watchdog(cfg.watchdog_s, env.rank) if self.install and cfg.watchdog_s > 0 else None

    def __enter__(self) -> FaultHandlers:
        if not self.install:
            return self
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
            # Restart interrupted system calls (gloo's socket I/O, file writes) instead of failing them with EINTR.
            signal.siginterrupt(sig, False)
        if self.env.world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # agreeing on the host: no device sync
        if self.watchdog is not None:
            self.watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.watchdog is not None:
            self.watchdog.close()

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum

    def step_started(self, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.step_started(step)

    def step_finished(self) -> None:
        if self.watchdog is not None:
            self.watchdog.step_finished()

    def agree_on_signal(self) -> str | None:
        """The preemption signal any rank has received (every rank gets the same answer), else None."""
        if not self.install:
            return None
        received = self.received
        if self.env.world_size > 1:
            flag = torch.tensor([received], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag)
        return signal.Signals(received).name if received else None


# ---------------------------------------------------------------------------------------------
# Non-finite steps.


class NonfiniteGuard:
    """Skips (or stops on) steps whose global gradient norm is not finite; see the module docstring for the cost.

    `rerun(step, position)` runs that step's forward and backward again on the same batch (same weights) and
    returns the global batch's sample indices; it is called once, with forward hooks armed, when the run stops.
    """

    def __init__(self, cfg: FaultConfig, optimizer: torch.optim.Optimizer, *, env: Env, run_dir: Path, model_cfg,
                 models: list[nn.Module], rerun: Callable[[int, int], list[int]], log: Callable[[str], None]):
        self.cfg, self.env, self.run_dir, self.model_cfg = cfg, env, Path(run_dir), model_cfg
        self.models, self.rerun, self.log = models, rerun, log
        self.optimizer = get_stepping_optimizer(optimizer)
        # Fused Adam/AdamW and ClippedAdamW take `found_inf` and leave parameters, moments and step counts as they were.
        fused = all(group.get("fused") for group in self.optimizer.param_groups) and getattr(
            self.optimizer, "_step_supports_amp_scaling", False)
        self.on_device = fused or isinstance(self.optimizer, ClippedAdamW)
        self.limit = cfg.max_skips if cfg.nonfinite == "skip" else 0  # non-finite steps in a row allowed
        self.pending: list[tuple[int, torch.Tensor, int]] = []  # (step, non-finite flag on device, sample position)
        self.in_a_row, self.skipped, self.skipped_steps = 0, 0, []
        self._bad: torch.Tensor | None = None
        self._in_a_row: torch.Tensor | None = None
        self._frozen: torch.Tensor | None = None

    def allows_update(self, step: int, grad_norm: torch.Tensor, position: int) -> bool:
        """Called after the gradient norm of `step`; False: do not call optimizer.step()."""
        bad = ~torch.isfinite(grad_norm)
        self._bad = bad
        self.pending.append((step, bad, position))
        if not self.on_device:
            self.check()  # one scalar read per step (see the module docstring)
            return self.in_a_row == 0  # check() just counted this step: 0 unless it was non-finite
        if self._in_a_row is None:
            self._in_a_row = torch.zeros((), dtype=torch.int32, device=bad.device)
            self._frozen = torch.zeros((), dtype=torch.bool, device=bad.device)
        # The same rule `check` applies on the host: past the limit every later update is refused too, so the
        # weights stay those of the step that stops the run until the host notices.
        self._in_a_row = torch.where(bad, self._in_a_row + 1, 0)
        self._frozen = self._frozen | (bad & (self._in_a_row > self.limit))
        self.optimizer.found_inf = (bad | self._frozen).float()
        return True

    def masked(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss, or zero for a skipped step (so the logged mean covers the steps that trained)."""
        return torch.where(self._bad, torch.zeros_like(loss), loss) if self._bad is not None else loss

    def check(self) -> None:
        """Read the pending flags (a host sync), log the skipped steps, stop when the policy says so."""
        if not self.pending:
            return
        records, self.pending = self.pending, []
        flags = torch.stack([bad for _, bad, _ in records]).tolist()
        for (step, _, position), bad in zip(records, flags):
            if not bad:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            if self.in_a_row > self.limit:
                self._stop(step, position)
            self.skipped += 1
            self.skipped_steps.append(step)
            self.log(f"step {step}: non-finite gradient norm; update skipped ({self.in_a_row} in a row,"
                     f" fault.max_skips={self.cfg.max_skips})")

    def take_skipped(self) -> int:
        """Steps skipped since the last call (call after `check`)."""
        skipped, self.skipped = self.skipped, 0
        return skipped

    def _stop(self, step: int, position: int) -> None:
        module, indices = self._find_module(step, position)
        if self.cfg.nonfinite == "stop":
            reason = "fault.nonfinite=stop"
        else:
            reason = f"{self.in_a_row} in a row, beyond fault.max_skips={self.cfg.max_skips}"
        where = (f"first non-finite output in module {module}" if module is not None else
                 "no module output was non-finite when the step was re-run (so it arose in the backward pass)")
        report = self.run_dir / "nonfinite.json"
        if self.env.is_main:
            report.write_text(json.dumps({
                "step": step, "reason": reason, "module": module, "sample_position": position,
                "sample_indices": indices, "skipped_steps": self.skipped_steps,
            }, indent=1) + "\n")
        raise NonFiniteError(f"non-finite gradient norm at step {step} ({reason}): {where};"
                             f" the batch's sample indices are in {report}")

    def _find_module(self, step: int, position: int) -> tuple[str | None, list[int]]:
        """Re-run `step` with a forward hook on every module; the first output that is not finite, over all ranks."""
        order = get_module_order(self.model_cfg)
        index = {name: i for i, name in enumerate(order)}
        first: list[str] = []

        def hook(name: str):
            def record(module, args, output) -> None:
                if not first and not _is_finite(output):
                    first.append(name)
            return record

        handles = [module.register_forward_hook(hook(get_clean_name(name)))
                   for model in self.models for name, module in model.named_modules()
                   if get_clean_name(name) in index]
        try:
            # Hooks with data-dependent checks do not trace: run compiled blocks eagerly for this once.
            with torch.compiler.set_stance("force_eager"):
                indices = self.rerun(step, position)
        finally:
            for handle in handles:
                handle.remove()
        found = index[first[0]] if first else len(order)
        if self.env.world_size > 1:  # the earliest in model order over all ranks (pipeline stages, TP shards)
            flag = torch.tensor([found], dtype=torch.int64, device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            found = int(flag)
        if found == len(order):
            return None, indices
        return (order[found] or "(the model's output)"), indices


# ---------------------------------------------------------------------------------------------
# Test hooks.


class FaultInjector:
    """fault.inject: make a fault happen at fault.inject_step on fault.inject_rank (-1: every rank), for tests.

    nan: a forward hook writes NaN into fault.inject_module's output for fault.inject_repeat steps. kill: SIGKILL
    right after the step's update. kill_in_save: SIGKILL inside that step's checkpoint save, once the files are
    written and before the COMMITTED marker. hang: sleep inside the step until something ends the process.
    sigterm: SIGTERM to this process right after the step's update (a preemption at a known step).
    kill and kill_in_save happen only in the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT=0).
    """

    def __init__(self, cfg: FaultConfig, env: Env, model_cfg):
        self.cfg, self.env = cfg, env
        self.kind = cfg.inject if cfg.inject_rank in (-1, env.rank) else ""
        self.step = 0
        self.hooked, self.wrote_nan = False, False
        if cfg.inject == "nan":
            names = get_module_order(model_cfg)
            if cfg.inject_module not in names:
                examples = [n for n in names if n.startswith("layers.0.")][:4]
                raise ConfigError(f"fault.inject_module={cfg.inject_module!r}: no such module; paths look like {examples}")

    def attach(self, models: list[nn.Module]) -> None:
        if self.kind != "nan":
            return
        for model in models:  # under pipeline parallelism only the stage that holds the module has it
            for name, module in model.named_modules():
                if get_clean_name(name) == self.cfg.inject_module:
                    module.register_forward_hook(self._write_nan)
                    self.hooked = True

    def _write_nan(self, module, args, output):
        first = self.cfg.inject_step
        if first <= self.step < first + self.cfg.inject_repeat:
            self.wrote_nan = True
            return output * float("nan")
        return None

    def _due(self, kind: str, step: int) -> bool:
        return self.kind == kind and step == self.cfg.inject_step

    def begin_step(self, step: int) -> None:
        self.step = step
        if self._due("hang", step):
            threading.Event().wait()  # releases the GIL, as a stuck collective would

    def end_step(self, step: int) -> None:
        if self._due("kill", step) and self.env.restart_count == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._due("nan", step) and self.hooked and not self.wrote_nan:
            # a module whose weights are used but whose own forward never runs
            raise ConfigError(f"fault.inject_module={self.cfg.inject_module!r}: its forward never ran in step {step};"
                              " choose a module that is called (e.g. layers.0.attention.wo, layers.0.feed_forward.w2)")

    def before_commit(self, step: int) -> None:
        if self._due("kill_in_save", step) and self.env.restart_count == 0:
            os.kill(os.getpid(), signal.SIGKILL)
