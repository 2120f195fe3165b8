"""One training run of the layout tests, under torchrun: the steps of trainer.train.train(), then this
rank's full (unsharded) parameters written to OUT_DIR/params_rank{rank}.safetensors.

    torchrun --standalone --nproc_per_node=N tests/layout_worker.py OUT_DIR [--break=no_dp_grad_sync] key=value...

Losses come from OUT_DIR/metrics.jsonl (rank 0 writes the global mean). `--break=no_dp_grad_sync`
turns off gradient reduction across data-parallel ranks (DDP and FSDP) by patching them here, so
tests/test_layouts.py can show that its comparison catches a broken layout; the product code has no
such switch. Must not hold comparisons: the test does those.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from parallel.materialize import get_clean_name  # noqa: E402
from trainer.config import load_config, validate  # noqa: E402
from trainer.data import build_data  # noqa: E402
from trainer.env import destroy_process_group, get_env, init_process_group  # noqa: E402
from trainer.checkpoint import find_load_source  # noqa: E402
from trainer.train import prepare_run_dir, train_loop  # noqa: E402

# What every layout shares: the debug recipe, fp32, on CPU, no validation or checkpoints, a loss per step.
BASE_OVERRIDES = ["recipe=debug", "log.every=1", "train.val_batches=0", "checkpoint.enabled=false",
                  "run.device=cpu", "train.precision=fp32", "log.progress=lines"]
BREAKS = ("no_dp_grad_sync",)


def break_dp_grad_sync() -> None:
    """Make every gradient-sync request a no-op 'do not sync': DDP never all-reduces, FSDP never reduce-scatters."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    set_sync = FSDPModule.set_requires_gradient_sync
    FSDPModule.set_requires_gradient_sync = lambda self, requires, *, recurse=True: set_sync(self, False, recurse=recurse)
    DistributedDataParallel.require_backward_grad_sync = property(lambda self: False, lambda self, value: None)


def record_linear_dtypes(seen: set[str]) -> None:
    """Patch the train loop's model builder to hook every block linear, collecting the dtype each one
    computed in (under the layout's own mixed precision: autocast or FSDP's MixedPrecisionPolicy)."""
    import trainer.train as train_module

    build = train_module.build_parallel_model

    def build_and_hook(*args, **kwargs):
        pm = build(*args, **kwargs)
        for model in pm.models:
            for name, module in model.named_modules():
                if name.startswith("layers.") and isinstance(module, torch.nn.Linear):
                    module.register_forward_hook(lambda m, a, out: seen.add(str(out.dtype).removeprefix("torch.")))
        return pm

    train_module.build_parallel_model = build_and_hook


def save_full_params(pm, out_dir: Path, rank: int) -> int:
    """All of this rank's stages, gathered whole (FSDP and TP shards joined); names as in the one-process model."""
    # cpu_offload=False: with it, only global rank 0 keeps the gathered values, and pp ranks hold other stages.
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    params = {}
    for part in pm.parts:
        for name, value in get_model_state_dict(part, options=options).items():
            params[get_clean_name(name)] = value.detach().to("cpu", torch.float32).contiguous()
    save_file(params, str(out_dir / f"params_rank{rank}.safetensors"))
    return len(params)


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    breaks = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--break=")]
    overrides = [a for a in argv[1:] if not a.startswith("--")]
    for name in breaks:
        if name not in BREAKS:
            raise SystemExit(f"--break={name}: choose one of {BREAKS}")
    if "no_dp_grad_sync" in breaks:
        break_dp_grad_sync()

    cfg = load_config([*BASE_OVERRIDES, f"run.dir={out_dir}", *overrides])
    env = get_env(cfg.run.device)
    degrees = validate(cfg, env.world_size)
    run_dir = prepare_run_dir(cfg, env.is_main)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = build_data(cfg, run_dir, log=print if env.is_main else lambda *_: None)
    init_process_group(env, cfg.parallel.backend)
    torch.manual_seed(cfg.train.seed)
    try:
        dtypes: set[str] = set()
        record_linear_dtypes(dtypes)
        _, pm = train_loop(cfg, env, degrees, run_dir, data, find_load_source(cfg.checkpoint, run_dir))
        count = save_full_params(pm, out_dir, env.rank)
        (out_dir / f"dtypes_rank{env.rank}.json").write_text(json.dumps(sorted(dtypes)))
        print(f"rank {env.rank}: wrote {count} full parameters", flush=True)
    finally:
        destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written; skip interpreter finalization. DTensor's redistribute caches keep the DeviceMesh,
    # and through it the gloo groups and their worker threads, alive past destroy_process_group; a worker
    # thread that frees a finished collective's tensor while the interpreter shuts down aborts the process
    # ("terminate called without an active exception"): a torch exit race that says nothing about the run.
    os._exit(code)
