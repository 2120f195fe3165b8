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
    # NaN/inf through the CLI parser (the per-key table is test_nonfinite_float_rejected)
    pytest.param(["optim.lr=nan"], ["optim.lr=nan", "finite"], id="lr-nan"),
    pytest.param(["optim.lr=inf"], ["optim.lr=inf", "finite"], id="lr-inf"),
    pytest.param(["model.init_std=inf"], ["model.init_std=inf", "finite"], id="init-std-inf"),
    pytest.param(["optim.grad_clip=-inf"], ["optim.grad_clip=-inf", "0 turns clipping off"], id="grad-clip-neg-inf"),
    # Interpolations fail when resolved: one line naming the key and the text
    pytest.param(["train.steps=${nope}"], ["train.steps='${nope}'", "nope", "not found"], id="interp-missing"),
    pytest.param(
        ["train.steps=${oc.env:RIDGELINE_TEST_SURELY_UNSET}"], ["train.steps=", "RIDGELINE_TEST_SURELY_UNSET"],
        id="interp-env-unset",
    ),
    pytest.param(["train.steps=${run.dir}"], ["train.steps='${run.dir}'", "Integer"], id="interp-wrong-type"),
    # A whole section given a scalar
    pytest.param(["run=5"], ["run=5", "mapping", "run."], id="section-scalar"),
    pytest.param(["fault=null"], ["fault=None", "mapping"], id="section-null"),
    pytest.param(["profile=[1]"], ["profile=[1]", "mapping"], id="section-list"),
    pytest.param(["train=5"], ["train='5'", "cpu", "gpu"], id="group-scalar"),
    # hf: with no folder (YAML reads a bare `hf:` as a mapping)
    pytest.param(["checkpoint.load=hf:"], ["checkpoint.load='hf:'", "needs a folder after hf:"], id="hf-bare"),
    pytest.param(["checkpoint.load='hf:'"], ["checkpoint.load='hf:'", "needs a folder after hf:"], id="hf-quoted"),
    pytest.param(["checkpoint.load=hf:/nonexistent"], ["checkpoint.load='hf:/nonexistent'", "no such"], id="hf-missing"),
    # torch.manual_seed takes [-2**63, 2**64 - 1]; negative seeds stay out
    pytest.param([f"train.seed={2**64}"], [f"train.seed={2**64}", "2**64 - 1"], id="seed-too-big"),
    pytest.param(["fault.watchdog_s=1e14"], ["fault.watchdog_s=100000000000000.0", "at most 1e9"], id="watchdog-huge"),
    pytest.param(["train.seed=-1"], ["train.seed=-1"], id="seed-negative"),
    pytest.param(["data.dataset=''"], ["data.dataset=''", "kjv"], id="dataset-empty"),
    pytest.param(["data.dataset=' '"], ["data.dataset=' '", "kjv"], id="dataset-blank"),
    pytest.param(["data.text_field=' '"], ["data.text_field=' '", "text column"], id="text-field-blank"),
    pytest.param(["data.cache_dir=''"], ["data.cache_dir=''", "must name a folder"], id="cache-dir-empty"),
    pytest.param(["train.fp8_output=true"], ["train.fp8_output=true", "train.precision='fp8'"], id="fp8-output-fp32"),
    pytest.param(["train.precision=bf16", "train.fp8_fast_accum=true"], ["train.fp8_fast_accum=true", "'bf16'"],
                 id="fp8-fast-accum-bf16"),
    pytest.param(["train.precision=fp8", "train.fp8_output=true", "train.fused_loss=true"],
                 ["train.fp8_output=true", "train.fused_loss=true"], id="fp8-output-fused-loss"),
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
        ("train:\n  steps: ${nope}\n", ["train.steps='${nope}'", "nope"]),
        ("defaults: 5\n", ["defaults=5", "must be a list"]),
        ("defaults:\n  model: small\n", ["defaults={'model': 'small'}", "must be a list"]),
        ("run: 5\n", ["run=5", "mapping"]),
        ("train: 5\n", ["train=5", "mapping"]),
        ("checkpoint:\n  load: 'hf:'\n", ["checkpoint.load='hf:'", "needs a folder after hf:"]),
        ("data:\n  dataset: ''\n", ["data.dataset=''", "kjv"]),
    ],
    ids=["group", "key", "type", "yaml", "interp", "defaults-int", "defaults-map", "run-int", "train-int", "hf",
         "dataset-empty"],
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


def _float_keys() -> list[str]:
    cfg = Config()
    return [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, section.name))
        for f in dataclasses.fields(getattr(cfg, section.name)) if isinstance(getattr(getattr(cfg, section.name), f.name), float)
    ]


FLOAT_KEYS = _float_keys()


def test_float_keys_table_covers_the_known_floats():
    assert {"optim.lr", "optim.eps", "optim.weight_decay", "optim.grad_clip", "model.norm_eps", "model.rope_theta",
            "model.init_std", "fault.watchdog_s", "log.peak_tflops", "data.val_fraction"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_nonfinite_float_rejected(key, value):
    cfg = Config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=1)
    assert str(info.value).startswith(f"{key}={value}: must be a finite number")


def test_zero_keeps_its_off_meaning():
    cfg = load_config(["recipe=debug", "optim.grad_clip=0", "fault.watchdog_s=0", "log.peak_tflops=0"])
    assert (cfg.optim.grad_clip, cfg.fault.watchdog_s, cfg.log.peak_tflops) == (0, 0, 0)


def test_good_values_next_to_the_new_checks(tmp_path):
    cfg = load_config(["recipe=debug", "train.val_every=${train.steps}", f"train.seed={2**64 - 1}"])
    assert cfg.train.val_every == cfg.train.steps == 20 and cfg.train.seed == 2**64 - 1
    # A broken interpolation in the recipe is fine once the command line replaces it.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults:\n  - model: debug\ntrain:\n  steps: ${nope}\n  seq_len: 32\n")
    assert load_config([f"recipe={recipe}", "train.steps=3"]).train.steps == 3
    # Synthetic data never reads data.dataset.
    assert load_config(["recipe=debug", "data=synthetic", "data.dataset=''"]).data.dataset == ""
    # A string key takes `x:` as written, not as a YAML mapping.
    assert load_config(["recipe=debug", "run.dir=runs/a:"]).run.dir == "runs/a:"


def test_cuda_device_needs_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        load_config(["recipe=debug", "run.device=cuda"])
    assert str(info.value) == "run.device='cuda': no CUDA device here (torch.cuda.is_available() is False)"
    assert load_config(["recipe=debug", "run.device=auto"]).run.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(["recipe=debug", "run.device=cuda"]).run.device == "cuda"


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
    # These two were tracebacks (exit 1) before: interpolation resolution, a non-list `defaults`.
    "interpolation": (["recipe=debug", "train.steps=${nope}"], "train.steps='${nope}'"),
    "defaults-not-list": (["recipe={tmp}/defaults.yaml"], "defaults=5"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Start every CLI case at once (each pays the torch import), then collect them."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "defaults.yaml").write_text("defaults: 5\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "trainer", *(a.replace("{tmp}", str(tmp)) for a in argv)], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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


def test_nan_injection_on_a_stage_without_the_module_is_refused(monkeypatch):
    """Under a pipeline a rank holds only its stage's modules: an injection aimed elsewhere would silently do nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    inject = ["recipe=debug", "parallel.pp=2", "fault.inject=nan", "fault.inject_step=3", "fault.inject_rank=1"]
    with pytest.raises(ConfigError, match=r"not on fault.inject_rank=1, whose pipeline stage\(s\) hold layers \['1'\]"):
        load_config([*inject, "fault.inject_module=layers.0.feed_forward.w2"])
    for held in ("layers.1.feed_forward.w2", "output"):
        load_config([*inject, f"fault.inject_module={held}"])
