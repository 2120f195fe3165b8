"""Throughput benchmark: `python -m trainer.bench recipe=bench_1b [warmup=20] [key=value ...]`.

Runs the normal trainer, then measures steady state from metrics.jsonl: tokens/s over the steps
after `warmup` (20 by default, as the reference measures steps 21-60), MFU by the model's FLOPs
per token, peak memory. Prints one line and appends a JSON record to <run.dir>/bench.jsonl.
Must not hold a second training loop.
"""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

from models import flops_per_token
from parallel.activation_checkpoint import get_recompute_flops_per_token
from trainer.checkpoint import find_load_source, read_commit_info
from trainer.config import Config, ConfigError, load_config, parse_int, print_help
from trainer.env import get_env, get_peak_tflops, report_error
from trainer.faults import NonFiniteError


def summarize(cfg: Config, records: list[dict], warmup: int) -> dict:
    """Steady-state figures between the log step at `warmup` and the last one."""
    steps = [r for r in records if "loss" in r]
    start = next((r for r in steps if r["step"] == warmup), None)
    end = steps[-1] if steps else None
    if start is None or end is None or end["step"] <= warmup:
        raise ConfigError(f"warmup={warmup}: needs a log step at {warmup} and later ones (set log.every to divide it)")
    tokens = (end["step"] - start["step"]) * cfg.train.global_batch_size * cfg.train.seq_len
    tokens_per_s = tokens / (end["time_s"] - start["time_s"])
    env = get_env(cfg.run.device)
    per_device = tokens_per_s / env.world_size
    peak = get_peak_tflops(env.device, cfg.log.peak_tflops)
    flops = flops_per_token(cfg.model, cfg.train.seq_len)
    # Hardware FLOPs count what checkpointing recomputes too; MFU does not (the same work, done once).
    hardware_flops = flops + get_recompute_flops_per_token(cfg.model, cfg.train.seq_len,
                                                           cfg.train.activation_checkpointing, cfg.train.ac_every)
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "world_size": env.world_size,
        "recipe": cfg.recipe,
        "precision": cfg.train.precision,
        **({"fp8_recipe": cfg.train.fp8_recipe, "fp8_output": cfg.train.fp8_output,
            "fp8_fast_accum": cfg.train.fp8_fast_accum} if cfg.train.precision == "fp8" else {}),
        "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "attention_backend": cfg.train.attention_backend,
        "fused_loss": cfg.train.fused_loss,
        "batch": cfg.train.global_batch_size,
        "seq_len": cfg.train.seq_len,
        "steps": f"{warmup + 1}-{end['step']}",
        "tokens_per_s": round(tokens_per_s),
        "tokens_per_s_per_device": round(per_device),
        "flops_per_token": flops,
        "mfu": round(per_device * flops / (peak * 1e12), 4) if peak else None,
        "hfu": round(per_device * hardware_flops / (peak * 1e12), 4) if peak else None,
        "peak_mem_gb": round(end["mem_gb"], 1),
        "final_loss": round(end["loss"], 4),
    }


def check_warmup(warmup: int, steps: int, log_every: int | None) -> None:
    """Before training: summarize() needs a log step at `warmup` and a later one (train.steps is always logged);
    log_every=None skips the second check (a sweep whose points set log.every themselves)."""
    if not 1 <= warmup < steps:
        raise ConfigError(f"warmup={warmup}: must be in [1, train.steps={steps}) (bench measures the steps after it)")
    if log_every is not None and warmup % log_every:
        raise ConfigError(f"warmup={warmup}: not a multiple of log.every={log_every} (bench needs a log step there)")


def check_resume(cfg: Config, warmup: int) -> None:
    """Before training: the log steps from `warmup` on must all be this run's (an earlier run's clock is another)."""
    source = find_load_source(cfg.checkpoint, Path(cfg.run.dir))
    if source.resumes:
        step = int(read_commit_info(source.path).get("step", 0))
        if step >= warmup:
            own = Path(cfg.run.dir).resolve() in Path(source.path).resolve().parents
            fix = "a fresh run.dir" if own else "no checkpoint.load"
            raise ConfigError(f"warmup={warmup}: the run resumes from step {step} ({source.path}), so step {warmup} "
                              f"was timed by an earlier run; give {fix} or warmup above {step}")


def main(argv: list[str]) -> int:
    if print_help(argv, __doc__):
        return 0
    warmup = 20
    overrides = []
    try:
        for item in argv:
            if item.startswith("warmup="):
                warmup = parse_int("warmup", item.split("=", 1)[1])
            else:
                overrides.append(item)
        cfg = load_config(overrides)
        check_warmup(warmup, cfg.train.steps, cfg.log.every)
        check_resume(cfg, warmup)
        from trainer.train import train

        last = train(cfg)
    except ConfigError as exc:
        return report_error(str(exc), 2)
    except NonFiniteError as exc:
        return report_error(str(exc), 1)
    if get_env().rank != 0:
        return 0
    if "loss" not in last:  # resumed at train.steps: metrics.jsonl holds only an earlier run's figures
        print(f"error: run.dir={cfg.run.dir!r}: nothing left to train (resumed at train.steps={cfg.train.steps}); "
              "no bench record written: give a fresh run.dir", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run.dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    try:
        result = summarize(cfg, records, warmup)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(run_dir / "bench.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
    print(f"bench: {result['tokens_per_s']:,} tokens/s ({result['tokens_per_s_per_device']:,}/device), MFU {mfu}, "
          f"peak {result['peak_mem_gb']} GiB, steps {result['steps']} | {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
