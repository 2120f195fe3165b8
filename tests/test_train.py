"""End-to-end: the default recipe learns, the CLI and torchrun drive a run, the run dir holds what it should."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.metrics import format_metrics
from trainer.optim import get_lr_factor
from trainer.config import OptimConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_recipe_loss_falls(tmp_path):
    """The default model learns the corpus: from ~ln(384)=5.95 to under 3.0 in 25 steps."""
    from trainer.train import train

    cfg = load_config(["train.steps=25", "log.every=1", f"run.dir={tmp_path}", "checkpoint.enabled=false",
                       "train.val_batches=0"])
    train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 25
    assert losses[0] > 5.0, losses[0]
    assert losses[-1] < 3.0, losses
    assert losses[-1] < losses[0] - 2.5


def test_torchrun_smoke_writes_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "trainer",
         "recipe=debug", "train.steps=6", "log.every=3", f"run.dir={run_dir}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run dir {run_dir}" in result.stdout.splitlines()[-1]
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [3, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb"):
        assert key in records[-1], key
    assert all(math.isfinite(r["loss"]) for r in records)
    # The resolved config is itself a runnable recipe.
    rerun = load_config([f"recipe={run_dir / 'config.yaml'}"])
    assert rerun.train.steps == 6 and rerun.model.dim == 64


def test_progress_line_names_every_field():
    line = format_metrics(5, 10, {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0, "mfu": 0.42,
                                  "mem_gb": 1.5, "eta_s": 75})
    for part in ("step 5/10", "loss 2.5000", "lr 1.00e-03", "gnorm 0.500", "1,234 tok/s", "mfu 42.0%", "1.5GiB", "1m15s"):
        assert part in line, part


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    factors = [get_lr_factor(s, total_steps=100, cfg=cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(factors[:10], factors[1:10]))
    if schedule == "constant":
        assert factors[-1] == 1.0
    else:
        assert factors[-1] == pytest.approx(0.1)
        assert all(b <= a + 1e-12 for a, b in zip(factors[10:], factors[11:]))
    if schedule == "wsd":
        assert factors[79] == 1.0 and factors[85] < 1.0


VAL_COMMON = ["recipe=debug", "model.num_layers=4", "train.micro_batch_size=0", "train.steps=4", "train.val_every=4",
              "log.every=4", "checkpoint.enabled=false"]


@pytest.fixture(scope="module")
def one_process_val(tmp_path_factory) -> dict:
    from trainer.train import train

    run_dir = tmp_path_factory.mktemp("val_one")
    train(load_config([*VAL_COMMON, f"run.dir={run_dir}"]))
    return {k: v for r in read_metrics(run_dir) for k, v in r.items()}


@pytest.mark.parametrize("layout", [
    ["parallel.dp_replicate=2", "parallel.zero=0"],
    ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2"],
], ids=["ddp2", "pp2_1f1b", "pp2_interleaved"])
def test_default_micro_batch_and_val_set_follow_the_layout(tmp_path, one_process_val, layout):
    """train.micro_batch_size=0 (the default) gives each rank its share of the global batch, and the validation set
    is shared out the same way (a pipeline through the schedule's forward-only pass): 2 processes log the
    one-process training and validation losses."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
         *VAL_COMMON, *layout, f"run.dir={tmp_path}"],
        cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = {k: v for r in read_metrics(tmp_path) for k, v in r.items()}
    assert two["loss"] == pytest.approx(one_process_val["loss"], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one_process_val["val_loss"], abs=1e-5)


def test_wandb_gets_the_run_config(tmp_path, monkeypatch):
    import trainer.metrics
    from trainer.train import train

    started = {}
    monkeypatch.setattr(trainer.metrics, "_start_wandb",
                        lambda run_dir, mode, project, config: started.update(mode=mode, config=config))
    train(load_config(["recipe=debug", "train.steps=2", "log.wandb=offline", f"run.dir={tmp_path}",
                       "checkpoint.enabled=false", "train.val_batches=0"]))
    assert started["mode"] == "offline" and started["config"]["train"]["steps"] == 2
    assert started["config"]["model"]["dim"] == load_config(["recipe=debug"]).model.dim


def test_tied_embeddings_stay_tied_in_the_trained_model(tmp_path):
    """Materialising from meta unties modules (Module.to_empty); the trainer ties them again, so the output layer
    trains the embedding table and an export's shared table is the one that was trained."""
    import dataclasses

    from models import Transformer
    from trainer.checkpoint import _dcp_load, find_load_source
    from trainer.train import train

    cfg = load_config(["recipe=debug", "model.tie_embeddings=true", "train.steps=2", "log.every=1",
                       "train.val_batches=0", f"run.dir={tmp_path}", "checkpoint.enabled=true", "checkpoint.every=2"])
    train(cfg)
    # Read both names into an untied model: a run that trained two tables saves two different ones.
    untied = Transformer(dataclasses.replace(cfg.model, tie_embeddings=False))
    _dcp_load({"model": untied.state_dict()}, find_load_source(cfg.checkpoint, tmp_path).path)
    assert untied.output.weight.equal(untied.tok_embeddings.weight)
