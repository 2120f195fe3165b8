"""What a run reports: the console progress line, metrics.jsonl, and wandb.

Only rank 0 reports. Must not compute metrics that need device syncs outside log steps.
"""
from __future__ import annotations

import json
import math
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


class MetricsLogger:
    """Console (a live line on a terminal, plain lines otherwise), JSONL, and optional wandb."""

    def __init__(self, run_dir: Path, *, enabled: bool, progress: str = "auto", wandb_mode: str = "disabled",
                 wandb_project: str = "ridgeline", config: dict | None = None, resume: bool = False):
        self.enabled = enabled
        self.live = enabled and (progress == "bar" or (progress == "auto" and sys.stdout.isatty()))
        self.jsonl = None
        self.wandb = None
        self.start = time.time()
        if not enabled:
            return
        # Append: a resumed run keeps the lines written before it.
        self.jsonl = open(run_dir / "metrics.jsonl", "a" if resume else "w", buffering=1)
        if wandb_mode != "disabled":
            self.wandb = _start_wandb(run_dir, wandb_mode, wandb_project, config)

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
