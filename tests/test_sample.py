"""Sampling: the KV-cache path gives the no-cache path's logits (every positional scheme, GQA, chunked prefill),
greedy/top-k/temperature choices, seeded determinism, and the `python -m trainer.sample` CLI on a checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from models import ModelConfig, Transformer
from trainer.config import load_config, to_yaml
from trainer.sample import build_kv_caches, generate, get_next_token

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> Transformer:
    base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=48)
    model = Transformer(ModelConfig(**{**base, **overrides}))
    model.init_weights(3)
    return model.eval()


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned", "sinusoidal"])
@torch.no_grad()
def test_kv_cache_logits_match_full_forward(pos_encoding):
    model = tiny(pos_encoding=pos_encoding, init_std=0.2)  # larger weights: attention patterns that matter
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    caches = build_kv_caches(model, 20)
    chunks, start, cached = [7, 3, 1, 1, 4, 1, 3], 0, []
    for size in chunks:  # a prefill, then chunks and single tokens
        cached.append(model(tokens[:, start:start + size], start_pos=start, kv_caches=caches))
        start += size
    torch.testing.assert_close(torch.cat(cached, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generate_cache_parity_and_determinism():
    model = tiny(init_std=0.2)
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    greedy = generate(model, prompt, max_new_tokens=12)
    assert torch.equal(greedy, generate(model, prompt, max_new_tokens=12, use_cache=False))
    assert torch.equal(greedy, generate(model, prompt, max_new_tokens=12, temperature=1.0, top_k=1,
                                        generator=torch.Generator().manual_seed(5)))
    draw = lambda seed, **kw: generate(model, prompt, max_new_tokens=12, temperature=1.5,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(0), draw(0)) and torch.equal(draw(0), draw(0, use_cache=False))
    assert not all(torch.equal(draw(0), draw(seed)) for seed in range(1, 4))
    stop = int(greedy[0, 3])
    assert generate(model, prompt, max_new_tokens=12, eos_id=stop).shape[1] <= 4  # stops at the end token


def test_top_k_keeps_only_the_top():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    picks = {int(get_next_token(logits, temperature=2.0, top_k=2, generator=torch.Generator().manual_seed(s)))
             for s in range(50)}
    assert picks == {1, 2}


def test_sample_cli(tmp_path, capsys):
    from trainer.sample import main

    cfg = load_config(["recipe=debug", f"data.cache_dir={ROOT / '.cache' / 'ridgeline'}"])
    model = Transformer(cfg.model)
    model.init_weights(0)
    folder = tmp_path / "run" / "checkpoints" / "step_000001"
    dcp.save({"model": model.state_dict()}, checkpoint_id=folder, no_dist=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "COMMITTED").write_text(json.dumps({"step": 1}))
    argv = [f"checkpoint={tmp_path / 'run'}", "prompt=In the beginning", "max_new_tokens=8", "temperature=0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("In the beginning") and main(argv) == 0 and capsys.readouterr().out == out
    assert main(argv[:2] + ["max_new_tokens=500"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "beyond model.max_seq_len=256" in err


def test_help(capsys):
    from trainer.sample import main

    assert main(["--help"]) == 0 and "checkpoint=PATH prompt=" in capsys.readouterr().out
