"""Chinchilla sizing: the scaling-law maths against the paper, the shape rule, generated recipes and the ladder."""

from pathlib import Path

import pytest

from models import count_params
from recipes import chinchilla
from trainer.config import load_config

# Hoffmann et al. 2022, Table 3: (parameters, FLOPs, tokens).
TABLE3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12),
          (175e9, 3.85e24, 3.7e12)]


@pytest.mark.parametrize("params, flops, tokens", TABLE3)
def test_tokens_per_param_rule_matches_table3(params, flops, tokens):
    """N within 5 %, D within 10 %: the table's tokens are rounded to two digits and run 20-22 per parameter."""
    n, d = chinchilla.get_tokens_per_param_allocation(flops)
    assert n == pytest.approx(params, rel=0.05)
    assert d == pytest.approx(tokens, rel=0.10)
    assert 6 * n * d == pytest.approx(flops, rel=1e-12)


def test_approach3_allocation_is_the_constrained_minimum():
    a = chinchilla.BETA / (chinchilla.ALPHA + chinchilla.BETA)
    # The paper's Table 2 reports a = 0.46, b = 0.54 for Approach 3 (from its unrounded fit).
    assert a == pytest.approx(0.46, abs=0.01) and 1 - a == pytest.approx(0.54, abs=0.01)
    for compute in (1e19, 5.76e23):
        n, d = chinchilla.get_approach3_allocation(compute)
        assert 6 * n * d == pytest.approx(compute, rel=1e-9)
        best = chinchilla.get_loss(n, d)
        for factor in (0.8, 0.95, 1.05, 1.25):  # any other split of the same compute predicts a higher loss
            assert chinchilla.get_loss(n * factor, d / factor) > best
    # Chinchilla itself (70B, 1.4T tokens): the fit's well-known ~1.94 nats.
    assert chinchilla.get_loss(70e9, 1.4e12) == pytest.approx(1.937, abs=0.002)


def test_hardware_budget_cli(capsys, tmp_path):
    out = tmp_path / "h100.yaml"
    assert chinchilla.main(["gpus=64", "hours=24", "gpu=h100", "mfu=0.4", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    compute = 64 * 24 * 3600 * 989e12 * 0.4
    assert f"compute {compute:.3g} FLOPs" in printed
    assert "Approach 3 fit" in printed and "<- used" in printed
    cfg = load_config([f"recipe={out}"])
    tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.train.seq_len
    assert 6 * count_params(cfg.model) * tokens == pytest.approx(compute, rel=0.01)  # rounding up to whole steps
    assert chinchilla.main(["gpus=8", "hours=1", "gpu=nosuchgpu"]) == 2
    assert "unknown" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["tokens_per_param", "approach3"])
def test_budget_recipe_round_trip(tmp_path, rule):
    out = tmp_path / "r.yaml"
    assert chinchilla.main(["budget=1e20", f"rule={rule}", "seq_len=1024", f"out={out}"]) == 0
    cfg = load_config([f"recipe={out}"])
    target, _ = chinchilla.get_allocation(1e20, rule)
    params = count_params(cfg.model)
    assert params == pytest.approx(target, rel=0.03)
    tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.train.seq_len
    assert tokens == pytest.approx(1e20 / (6 * params), rel=0.01)
    assert cfg.train.seq_len == 1024 and cfg.model.max_seq_len == 1024
    assert cfg.optim.schedule == "cosine" and cfg.optim.min_lr_ratio == 0.1
    assert 0 < cfg.optim.warmup_steps <= cfg.train.steps // 10
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    assert cfg.recipe == str(out) and cfg.data.synthetic


def test_shape_rule_for_each_rung():
    for name, target in chinchilla.LADDER.items():
        m = chinchilla.get_shape(target)
        assert count_params(m) == pytest.approx(target, rel=0.02), name
        assert m.dim % 128 == 0 and m.head_dim == (128 if m.dim >= 2048 else 64), name
        assert m.ffn_dim % 256 == 0 and 8 / 3 * m.dim <= m.ffn_dim < 8 / 3 * m.dim + 256, name
        aspect = m.dim / m.num_layers
        goal = chinchilla.get_target_aspect(target)
        assert goal / chinchilla.ASPECT_TOLERANCE <= aspect <= goal * chinchilla.ASPECT_TOLERANCE, name
        assert m.num_kv_heads == (8 if target >= 3e9 else m.num_heads), name
        assert m.vocab_size == 32000 and not m.tie_embeddings


def test_hparams_shrink_lr_and_grow_batch_with_size():
    lrs, batches = zip(*(chinchilla.get_hparams(n, 2048) for n in chinchilla.LADDER.values()))
    assert lrs[0] == pytest.approx(6e-4, rel=0.05) and lrs[-1] < 1e-4
    assert all(b <= a for a, b in zip(lrs, lrs[1:])) and all(b >= a for a, b in zip(batches, batches[1:]))
    assert 0.25e6 <= batches[0] * 2048 <= 1e6 and 1e6 <= batches[-1] * 2048 <= 4.2e6


def test_ladder_files_are_up_to_date_and_load():
    for plan in chinchilla.get_ladder_plans():
        path = chinchilla.RECIPE_DIR / f"{plan.name}.yaml"
        assert path.read_text() == chinchilla.render_recipe(plan), f"{path} is stale: python -m recipes.chinchilla ladder"
        cfg = load_config([f"recipe={plan.name}"])
        assert count_params(cfg.model) == plan.params
        tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.train.seq_len
        assert 20 * plan.params <= tokens < 20 * plan.params + cfg.train.global_batch_size * cfg.train.seq_len


@pytest.mark.parametrize("argv, said", [
    (["budget=inf"], "error: budget='inf': must be finite"),
    (["budget=1e400"], "error: budget='1e400': must be finite"),  # past float range
    (["peak_tflops=inf", "gpus=8", "hours=1"], "error: peak_tflops='inf': must be finite"),
    (["gpus=0.5", "hours=1", "gpu=h100"], "error: gpus='0.5': must be a whole number"),
    (["budget=1e21", "gpus=8", "hours=1", "gpu=h100"], "error: budget=1e21 gpus=8 hours=1 gpu=h100: give exactly one"),
    (["params=1e9", "seq_len=1.5"], "error: seq_len='1.5': must be a whole number"),
    (["params=1e9", "vocab=256"], "error: vocab=256: below the byte tokenizer's 257 tokens"),
    (["budget=1e10"], "error: budget=1e10: no recipe written: the closest shape has 8,716,928 parameters"),
    (["params=1e15"], "error: params=1e15: no recipe written: the closest shape has"),
])
def test_cli_refuses_bad_arguments_with_one_line(argv, said, tmp_path, capsys):
    out = tmp_path / "r.yaml"
    assert chinchilla.main([*argv, f"out={out}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(said) and captured.err.count("\n") == 1, captured.err
    assert captured.out == "" and not out.exists()


def test_cli_out_path_and_vocab_minimum(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    outs = ["", str(tmp_path), f"{a_file}/r.yaml"] + (["/proc/r.yaml"] if Path("/proc").is_dir() else [])
    for out in outs:
        assert chinchilla.main(["params=1e8", f"out={out}"]) == 2, out
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: out={out!r}:") and captured.err.count("\n") == 1, captured.err
        assert captured.out == "", out
    # The smallest vocabulary the generator takes is one the trainer takes.
    out = tmp_path / "v257.yaml"
    assert chinchilla.main(["params=1e8", f"vocab={chinchilla.MIN_VOCAB}", f"out={out}"]) == 0
    assert load_config([f"recipe={out}"]).model.vocab_size == 257
    assert chinchilla.main(["--help"]) == 0 and "python -m recipes.chinchilla budget=" in capsys.readouterr().out
