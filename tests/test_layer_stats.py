"""Per-block layer statistics: equal to a hand computation on a tiny model, written by the trainer in the
format trainer/report.py reads, nothing installed when off, and a 2-process FSDP run agreeing with one process."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import ModelConfig, Transformer
from trainer.config import load_config
from trainer.layer_stats import STATS, LayerStats, _BlockProbe

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ModelConfig(vocab_size=384, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=64)
RUN = ["recipe=debug", "train.steps=4", "log.layer_stats=2", "checkpoint.enabled=false", "train.val_batches=0",
       "log.progress=lines", "run.device=cpu"]


class RecordingLogger:
    def __init__(self):
        self.records = []

    def log(self, step, total, metrics, *, show=True):
        self.records.append((step, metrics))

    def info(self, message):
        pass


def test_layer_stats_equal_a_hand_computation(one_thread):
    torch.manual_seed(0)
    model = Transformer(DEBUG)
    model.init_weights(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logger = RecordingLogger()
    stats = LayerStats(3, [model], num_layers=2, world_size=1, pp=1, activation_replicas=1, logger=logger, total_steps=3)
    tokens = torch.randint(0, DEBUG.vocab_size, (4, 17))

    outputs = {0: [], 1: []}  # the hand computation's own view of the block outputs
    hooks = [model.layers[str(i)].register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out.detach().clone()))
             for i in range(2)]
    stats.begin(3)
    assert all(isinstance(layer, _BlockProbe) for layer in model.layers.values())
    for micro in tokens.chunk(2):  # two micro-batches: the activation stats cover both
        (model(micro[:, :-1], targets=micro[:, 1:]) / 2).backward()
    blocks = [model.layers[str(i)].block for i in range(2)]
    stats.after_backward()
    assert [model.layers[str(i)] for i in range(2)] == blocks  # no probe left for anything after backward
    before = [[p.detach().clone() for p in b.parameters()] for b in blocks]
    grads = [[p.grad.clone() for p in b.parameters()] for b in blocks]
    optimizer.step()
    result = stats.finish()
    for hook in hooks:
        hook.remove()

    def norm(tensors):
        return torch.cat([t.flatten() for t in tensors]).double().norm().item()

    for i, block in enumerate(blocks):
        assert model.layers[str(i)] is block  # the probe went at the end of backward
        after = [p.detach() for p in block.parameters()]
        acts = torch.cat([o.flatten() for o in outputs[i]]).double()
        assert result["grad_norm"][i] == pytest.approx(norm(grads[i]), rel=1e-5)
        assert result["param_norm"][i] == pytest.approx(norm(before[i]), rel=1e-5)
        update = norm([a - b for a, b in zip(after, before[i])])
        assert result["update_ratio"][i] == pytest.approx(update / norm(before[i]), rel=1e-4)
        assert result["act_rms"][i] == pytest.approx(acts.pow(2).mean().sqrt().item(), rel=1e-5)
        assert result["act_max"][i] == pytest.approx(acts.abs().max().item(), rel=1e-6)
        assert 0 < result["update_ratio"][i] < 1
    assert logger.records == [(3, {"layer_stats": result})]
    # Off a stats step: nothing installed, nothing logged.
    stats.begin(4)
    assert not any(isinstance(layer, _BlockProbe) for layer in model.layers.values())
    assert stats.finish() is None and len(logger.records) == 1


def run_and_read(run_dir: Path, *overrides) -> list[dict]:
    from trainer.train import train

    train(load_config([*RUN, f"run.dir={run_dir}", *overrides]))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, one_thread):
    return [r for r in run_and_read(tmp_path_factory.mktemp("one") / "run") if "layer_stats" in r]


def test_trainer_writes_layer_stats(one_process):
    assert [r["step"] for r in one_process] == [2, 4]
    for record in one_process:
        assert sorted(record["layer_stats"]) == sorted(STATS)
        for key in STATS:
            values = record["layer_stats"][key]
            assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), (key, values)


def test_layer_stats_off_installs_nothing(tmp_path, monkeypatch, one_thread):
    installed = []
    for name in ("register_forward_hook", "register_forward_pre_hook"):
        original = getattr(nn.Module, name)
        monkeypatch.setattr(nn.Module, name, lambda self, *a, _o=original, **k: (installed.append(type(self).__name__),
                                                                                  _o(self, *a, **k))[1])
    monkeypatch.setattr(_BlockProbe, "__init__", lambda *a, **k: installed.append("probe"))
    records = run_and_read(tmp_path / "run", "log.layer_stats=0", "train.steps=2")
    assert not any("layer_stats" in r for r in records)
    assert "probe" not in installed and "Block" not in installed, installed


def test_fsdp_two_processes_agree_with_one(one_process, tmp_path):
    """FSDP shards the parameters and each rank sees half the batch: the stats are still global."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer", *RUN,
         f"run.dir={tmp_path / 'run'}", "parallel.dp_shard=2", "train.micro_batch_size=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sharded = [r for r in records if "layer_stats" in r]
    assert [r["step"] for r in sharded] == [2, 4]
    for mine, reference in zip(sharded, one_process):
        for key in STATS:
            assert mine["layer_stats"][key] == pytest.approx(reference["layer_stats"][key], rel=1e-4), key


def test_layer_stats_reach_wandb_as_flat_scalars():
    from trainer.metrics import flatten_for_wandb

    flat = flatten_for_wandb({"loss": 1.5, "layer_stats": {"grad_norm": [0.1, 0.2], "act_max": [3.0, 4.0]}})
    assert flat == {"loss": 1.5, "layer_stats/grad_norm/0": 0.1, "layer_stats/grad_norm/1": 0.2,
                    "layer_stats/act_max/0": 3.0, "layer_stats/act_max/1": 4.0}


def test_pipeline_stats_agree_with_one_process_and_skip_its_first_step_activations(tmp_path, one_thread):
    """A pipeline's first step infers shapes with extra forwards (on empty inputs after the first stage): that step
    logs no activation statistics, and every later one equals the one-process run's."""
    every_step = ["log.layer_stats=1", "train.steps=2", "log.every=1"]
    one = [r for r in run_and_read(tmp_path / "one", *every_step) if "layer_stats" in r]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer", *RUN,
         *every_step, f"run.dir={tmp_path / 'pp'}", "parallel.pp=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "pp" / "metrics.jsonl").read_text().splitlines()]
    piped = [r for r in records if "layer_stats" in r]
    assert [r["step"] for r in piped] == [1, 2]
    assert "act_rms" not in piped[0]["layer_stats"] and "act_rms" in piped[1]["layer_stats"]
    for mine, reference in zip(piped, one):
        for key in mine["layer_stats"]:
            assert mine["layer_stats"][key] == pytest.approx(reference["layer_stats"][key], rel=1e-4), (mine["step"], key)
