"""Tests for trainer/config.py: composition order (groups < recipe < CLI), one-line ConfigErrors that
name the key path and value, mesh-degree resolution, and the CLI edge (exit 2, one line, no traceback)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# ---------------------------------------------------------------------------------------------
# Composition


def test_debug_recipe_values():
    cfg = load_config(["recipe=debug"])
    assert isinstance(cfg, Config)
    assert cfg.recipe == "debug"
    assert cfg.run.dir == "runs/debug"
    m = cfg.model  # configs/model/debug.yaml
    assert (m.vocab_size, m.dim, m.num_layers, m.num_heads, m.num_kv_heads, m.ffn_dim, m.max_seq_len) == (
        384, 64, 2, 4, 2, 128, 256,
    )
    assert m.pos_encoding == "rope"
    t = cfg.train  # recipes/debug.yaml
    assert (t.steps, t.seq_len, t.global_batch_size, t.micro_batch_size, t.val_every, t.val_batches) == (
        20, 64, 8, 4, 10, 2,
    )
    assert cfg.optim.warmup_steps == 5 and cfg.log.every == 5
    assert cfg.data.dataset == "kjv" and cfg.data.tokenizer == "byte"


def test_precedence_group_then_recipe_then_cli():
    group_only = load_config(["recipe=default"])
    assert group_only.train.seq_len == 256  # configs/train/cpu.yaml
    assert group_only.optim.warmup_steps == 20  # configs/optim/adamw.yaml

    recipe = load_config(["recipe=debug"])
    assert recipe.train.seq_len == 64  # the recipe beats the group
    assert recipe.optim.warmup_steps == 5
    assert recipe.train.precision == "fp32"  # untouched by the recipe: the group's value stays
    assert recipe.optim.lr == 3.0e-3

    cli = load_config(["recipe=debug", "train.seq_len=32", "optim.warmup_steps=2", "model.dim=128", "optim.lr=1e-4"])
    assert cli.train.seq_len == 32  # the CLI beats the recipe
    assert cli.optim.warmup_steps == 2
    assert cli.model.dim == 128  # ... and the group
    assert cli.optim.lr == 1e-4
    assert cli.model.num_layers == 2  # the rest of the group stays
    # Order on the command line does not matter for recipe= and group=.
    assert load_config(["train.seq_len=32", "recipe=debug"]).train.seq_len == 32


def test_group_switch_on_cli():
    cfg = load_config(["recipe=debug", "model=small"])
    assert (cfg.model.dim, cfg.model.num_layers, cfg.model.num_heads, cfg.model.max_seq_len) == (256, 4, 8, 1024)
    assert cfg.train.seq_len == 64  # the recipe's other values stay
    cfg = load_config(["recipe=debug", "model=small", "model.num_layers=3"])
    assert cfg.model.num_layers == 3 and cfg.model.dim == 256


def test_recipe_from_path(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults:\n  - model: debug\ntrain:\n  steps: 3\n  seq_len: 32\n")
    cfg = load_config([f"recipe={recipe}"])
    assert cfg.train.steps == 3 and cfg.model.dim == 64
    assert cfg.recipe == str(recipe)


def test_validate_resolves_inferred_degree():
    cfg = Config()
    cfg.parallel.dp_shard, cfg.parallel.tp, cfg.parallel.zero = -1, 2, 3
    cfg.train.micro_batch_size = 4
    degrees = validate(cfg, world_size=8)
    assert degrees == {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 2}
    assert cfg.parallel.dp_shard == -1  # validation never rewrites a value

    cfg = Config()
    cfg.parallel.dp_replicate, cfg.parallel.zero = -1, 0
    cfg.train.micro_batch_size = 4
    assert validate(cfg, world_size=4)["dp_replicate"] == 4
    assert validate(Config(), world_size=1) == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}


# ---------------------------------------------------------------------------------------------
# Bad configs: each names the key path and the offending value


BAD = [
    # (overrides on top of recipe=debug, substrings the message must hold)
    pytest.param(["train.stepz=5"], ["train.stepz", "unknown key", "steps"], id="unknown-key"),
    pytest.param(["trainn.steps=5"], ["trainn.steps", "unknown key"], id="unknown-section"),
    pytest.param(["foo=bar"], ["foo", "unknown key"], id="unknown-top-level-key"),
    pytest.param(["train.steps=abc"], ["train.steps", "abc"], id="wrong-type-int"),
    pytest.param(["model.tie_embeddings=maybe"], ["model.tie_embeddings", "maybe"], id="wrong-type-bool"),
    pytest.param(["train.steps=null"], ["train.steps", "None"], id="null"),
    pytest.param(["train.steps"], ["train.steps", "key=value"], id="no-equals"),
    pytest.param(["model.dim=65"], ["model.dim=65", "model.num_heads=4"], id="dim-not-divisible-by-heads"),
    pytest.param(["model.num_kv_heads=3"], ["model.num_kv_heads=3", "model.num_heads=4"], id="kv-heads"),
    pytest.param(["train.global_batch_size=10"], ["train.global_batch_size=10", "micro_batch_size", "4"], id="batch"),
    pytest.param(["train.seq_len=512"], ["train.seq_len=512", "model.max_seq_len=256"], id="seq-len"),
    pytest.param(["optim.lr=-1"], ["optim.lr=-1"], id="negative-lr"),
    pytest.param(
        ["model.pos_encoding=xpos"],
        ["model.pos_encoding", "xpos", "rope", "alibi", "sinusoidal", "learned"],
        id="pos-encoding",
    ),
    pytest.param(["recipe=nope"], ["recipe", "nope", "debug", "default"], id="unknown-recipe"),
    pytest.param(["model=huge"], ["model", "huge", "debug", "llama_1b", "small"], id="unknown-group-choice"),
    pytest.param(["model.dim=36"], ["model.dim", "model.num_heads", "9", "rope"], id="odd-head-dim-rope"),
    pytest.param(["parallel.tp=2"], ["parallel", "tp=2", "WORLD_SIZE=1"], id="degrees-vs-world-size"),
    pytest.param(["parallel.dp_shard=-1", "parallel.tp=-1"], ["parallel.", "dp_shard", "tp", "-1"], id="two-inferred"),
    pytest.param(["parallel.virtual_stages=2"], ["parallel.virtual_stages=2", "parallel.pp"], id="virtual-stages"),
    pytest.param(["parallel.sequence_parallel=true"], ["parallel.sequence_parallel=true", "parallel.tp"], id="sp"),
    pytest.param(["log.wandb=maybe"], ["log.wandb", "maybe", "disabled", "offline", "online"], id="wandb"),
    pytest.param(["checkpoint.load=/nonexistent/ckpt"], ["checkpoint.load", "/nonexistent/ckpt"], id="missing-ckpt"),
    pytest.param(["model.vocab_size=100"], ["model.vocab_size=100", "257"], id="vocab-below-tokenizer"),
    pytest.param(["train.precision=fp16"], ["train.precision", "fp16", "bf16"], id="precision"),
    pytest.param(["optim.beta2=1.0"], ["optim.beta2=1.0"], id="beta2"),
    pytest.param(["parallel.zero=4"], ["parallel.zero=4"], id="zero-stage"),
    pytest.param(["parallel.pp=0"], ["parallel.pp=0"], id="zero-degree"),
    pytest.param(["train.steps=0"], ["train.steps=0"], id="zero-steps"),
]


@pytest.mark.parametrize("overrides, expected", BAD)
def test_bad_config_raises_naming_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(["recipe=debug", *overrides])
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("defaults:\n  - modle: small\n", ["modle", "small", "unknown config group"]),
        ("train:\n  stepz: 3\n", ["train.stepz", "unknown key"]),
        ("train:\n  steps: abc\n", ["train.steps", "abc"]),
        ("train: [1,\n", ["recipe=", "cannot read", "line"]),
    ],
    ids=["group", "key", "type", "yaml"],
)
def test_bad_recipe_file(tmp_path, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config([f"recipe={recipe}"])
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def debug_config(**parallel) -> Config:
    cfg = load_config(["recipe=debug"])
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize(
    "model, parallel, world_size, expected",
    [
        (dict(num_heads=3, num_kv_heads=3, dim=96), dict(tp=2), 2, ["model.num_heads=3", "parallel.tp=2"]),
        (dict(num_kv_heads=1), dict(tp=2), 2, ["model.num_kv_heads=1", "parallel.tp=2"]),
        (dict(pos_encoding="alibi"), dict(tp=2), 2, ["model.pos_encoding", "alibi", "parallel.tp"]),
        (dict(), dict(dp_shard=2, zero=0), 2, ["parallel.dp_shard=2", "parallel.zero=0"]),
        (dict(), dict(pp=4, microbatches=4), 4, ["model.num_layers=2", "4"]),
        (dict(), dict(pp=2, pp_schedule="interleaved_1f1b"), 2, ["parallel.pp_schedule", "interleaved_1f1b"]),
        (dict(), dict(tp=4, dp_shard=-1, zero=3), 6, ["parallel.dp_shard=-1", "6", "4"]),
        (dict(), dict(tp=2), 4, ["WORLD_SIZE=4", "tp=2"]),
    ],
    ids=["tp-heads", "tp-kv-heads", "tp-alibi", "dp-shard-zero0", "pp-layers", "interleaved-v1", "infer", "product"],
)
def test_bad_parallel_config_for_world_size(model, parallel, world_size, expected):
    cfg = debug_config(**parallel)
    for key, value in model.items():
        setattr(cfg.model, key, value)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size)
    for part in expected:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def test_load_config_reads_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_config(["recipe=debug", "parallel=ddp"]).parallel.dp_replicate == -1
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        load_config(["recipe=debug"])


# ---------------------------------------------------------------------------------------------
# The CLI edge


CLI_CASES = {
    "divisible": (["recipe=debug", "model.dim=65"], "model.dim=65"),
    "recipe": (["recipe=nope"], "nope"),
    "unknown-key": (["recipe=debug", "train.stepz=1"], "train.stepz"),
}


@pytest.fixture(scope="module")
def cli_runs():
    """Start every CLI case at once (each pays the torch import), then collect them."""
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "trainer", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for name, (argv, _) in CLI_CASES.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_config_exits_2_with_one_line(cli_runs, name):
    returncode, stdout, stderr = cli_runs[name]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr + stdout
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, stderr
    assert CLI_CASES[name][1] in lines[0]


def test_cli_help_lists_recipes_and_groups(capsys):
    from trainer.__main__ import main

    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: torchrun") and "bench_1b" in usage and "parallel=ddp|fsdp|single" in usage


def test_cli_cfg_prints_the_validated_config_and_runs_nothing(tmp_path, capsys):
    from trainer.__main__ import main

    run_dir = tmp_path / "run"
    assert main(["recipe=debug", f"run.dir={run_dir}", "train.steps=7", "--cfg"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    reloaded = load_config([f"recipe={tmp_path / 'printed.yaml'}"])
    expected = load_config(["recipe=debug", f"run.dir={run_dir}", "train.steps=7"])
    assert dataclasses.replace(reloaded, recipe="debug") == expected
    assert not run_dir.exists()
    assert main(["recipe=debug", "train.steps=-1", "--cfg"]) == 2 and "train.steps=-1" in capsys.readouterr().err
