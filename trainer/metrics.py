"""What a run reports: the console progress line, metrics.jsonl, and wandb.

Only rank 0 reports. Must not compute metrics that need device syncs outside log steps.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def flatten_for_wandb(metrics: dict) -> dict:
    """Nested dicts and lists as 'key/sub/i' scalars: wandb charts scalars, not lists."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_for_wandb({f"{key}/{k}": v for k, v in value.items()}))
        elif isinstance(value, list):
            flat.update(flatten_for_wandb({f"{key}/{i}": v for i, v in enumerate(value)}))
        else:
            flat[key] = value
    return flat


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def format_metrics(step: int, total: int, m: dict) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}",
             f"{m['tokens_per_s']:,.0f} tok/s"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    parts += [f"mem {m['mem_gb']:.1f}GiB", f"eta {format_duration(m['eta_s'])}"]
    return " | ".join(parts)


SUPERSEDED = "metrics.superseded.jsonl"


class MetricsLogger:
    """Console (a live line on a terminal, plain lines otherwise), JSONL, and optional wandb.

    Console lines work at once; metrics.jsonl and wandb only after `open`, which the trainer calls once the
    checkpoint has loaded, so a run that fails on its inputs leaves an existing run's log as it was.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, progress: str = "auto", wandb_mode: str = "disabled",
                 wandb_project: str = "ridgeline", config: dict | None = None):
        self.enabled, self.run_dir = enabled, Path(run_dir)
        self.live = enabled and (progress == "bar" or (progress == "auto" and sys.stdout.isatty()))
        self.wandb_mode, self.wandb_project, self.config = wandb_mode, wandb_project, config
        self.jsonl = None
        self.wandb = None
        self.start = time.time()

    def open(self, resumed_step: int | None) -> None:
        """Start metrics.jsonl: a fresh run rewrites it; a run resumed at `resumed_step` appends to it, after
        moving the records of later steps (work the resume redoes) to metrics.superseded.jsonl."""
        if not self.enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        if resumed_step is not None and path.is_file():
            self._supersede(path, resumed_step)
        self.jsonl = open(path, "a" if resumed_step is not None else "w", buffering=1)
        if self.wandb_mode != "disabled":
            self.wandb = _start_wandb(self.run_dir, self.wandb_mode, self.wandb_project, self.config)

    def _supersede(self, path: Path, resumed_step: int) -> None:
        kept, superseded = [], []
        for line in path.read_text().splitlines(keepends=True):
            try:
                step = json.loads(line)["step"] if line.endswith("\n") else None
            except (ValueError, KeyError, TypeError):
                step = None  # a line torn by a crash
            (kept if step is not None and step <= resumed_step else superseded).append(line)
        if not superseded:
            return
        with open(self.run_dir / SUPERSEDED, "a") as file:
            file.writelines(line if line.endswith("\n") else line + "\n" for line in superseded)
        staged = path.with_name(path.name + ".tmp")
        staged.write_text("".join(kept))
        os.replace(staged, path)
        self.info(f"metrics: {len(superseded)} records past step {resumed_step} (redone from the checkpoint) moved to "
                  f"{SUPERSEDED}")

    def info(self, message: str) -> None:
        if self.enabled:
            if self.live:
                sys.stdout.write("\r\033[K")
            print(message, flush=True)

    def log(self, step: int, total: int, metrics: dict, *, show: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics, "time_s": round(time.time() - self.start, 3)}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(flatten_for_wandb(metrics), step=step)
            except Exception as exc:  # a wandb failure never stops training
                self.info(f"wandb: logging failed ({exc}); continuing without it")
                self.wandb = None
        if not show:
            return
        line = format_metrics(step, total, metrics)
        if self.live:
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.live:
            sys.stdout.write("\n")
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass


def _start_wandb(run_dir: Path, mode: str, project: str, config: dict | None):
    try:
        import wandb

        return wandb.init(project=project, dir=str(run_dir), mode=mode, config=config, name=run_dir.name)
    except Exception as exc:
        print(f"wandb: not started ({' '.join(str(exc).split())}); training continues without it", flush=True)
        return None
