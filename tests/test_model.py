"""Unit tests for models/llama.py: shapes, meta-device build and seeded init, GQA/MQA, positional
schemes, KV-cache decoding, parameter/FLOP counts, and the no-distributed-code rule for models/."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from models import ModelConfig, Transformer, count_params, flops_per_token
from models.llama import alibi_bias, alibi_slopes, apply_rope, rope_tables

ROOT = Path(__file__).resolve().parent.parent
POS_ENCODINGS = ("rope", "alibi", "sinusoidal", "learned")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32)
    return ModelConfig(**{**base, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    return model.eval()


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Shapes, meta build, seeded init


@pytest.mark.parametrize("pos", POS_ENCODINGS)
def test_logits_shape(pos):
    cfg = tiny(pos_encoding=pos)
    model = build(cfg)
    with torch.no_grad():
        assert model(tokens(cfg, 3, 10)).shape == (3, 10, cfg.vocab_size)
        model.output = None
        assert model(tokens(cfg, 3, 10)).shape == (3, 10, cfg.dim)


@pytest.mark.parametrize(
    "overrides", [dict(pos_encoding=p) for p in POS_ENCODINGS] + [dict(tie_embeddings=True), dict(num_kv_heads=1)]
)
def test_meta_build_then_init_matches_cpu_build(overrides):
    cfg = tiny(**overrides)
    with torch.device("meta"):
        meta_model = Transformer(cfg)
    assert all(p.is_meta for p in meta_model.parameters())
    meta_model.to_empty(device="cpu")
    meta_model.init_weights(seed=7)
    cpu_model = build(cfg, seed=7)

    meta_params, cpu_params = dict(meta_model.named_parameters()), dict(cpu_model.named_parameters())
    assert meta_params.keys() == cpu_params.keys()
    for name, param in cpu_params.items():
        assert meta_params[name].device.type == "cpu"
        assert torch.equal(meta_params[name], param), name
    meta_buffers, cpu_buffers = dict(meta_model.named_buffers()), dict(cpu_model.named_buffers())
    assert meta_buffers.keys() == cpu_buffers.keys()
    for name, buf in cpu_buffers.items():
        assert torch.equal(meta_buffers[name], buf), name
    if cfg.tie_embeddings:
        assert meta_model.output.weight is meta_model.tok_embeddings.weight
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(meta_model.eval()(x), cpu_model(x))

    other = build(cfg, seed=8)
    assert not torch.equal(other.layers["0"].attention.wq.weight, cpu_model.layers["0"].attention.wq.weight)


def test_init_independent_of_split():
    cfg = tiny(num_layers=3)
    full = build(cfg, seed=3)
    part = Transformer(cfg)
    del part.layers["1"]
    part.output = None
    part.tok_embeddings = None
    part.init_weights(seed=3)

    full_params = dict(full.named_parameters())
    part_params = dict(part.named_parameters())
    # Names keep their global layer index, so checkpoints and init seeds line up in every layout.
    assert "layers.2.attention.wq.weight" in part_params and "layers.1.attention.wq.weight" not in part_params
    assert "output.weight" not in part_params and "tok_embeddings.weight" not in part_params
    for name, param in part_params.items():
        assert torch.equal(param, full_params[name]), name
    # Seeded per name, not one shared stream: same-shaped tensors in different layers differ.
    assert not torch.equal(full_params["layers.0.attention.wq.weight"], full_params["layers.2.attention.wq.weight"])


def test_init_statistics():
    cfg = tiny(dim=128, num_heads=4, num_kv_heads=4, ffn_dim=256, num_layers=8, init_std=0.02)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    scaled = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    layer = model.layers["3"]
    assert layer.attention.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert layer.attention.wo.weight.std().item() == pytest.approx(scaled, rel=0.1)
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(scaled, rel=0.1)
    assert torch.equal(layer.attention_norm.weight, torch.ones(cfg.dim))
    assert torch.equal(model.norm.weight, torch.ones(cfg.dim))


@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal", "alibi"])
def test_pipeline_split_matches_full_model(pos):
    cfg = tiny(pos_encoding=pos)
    full = build(cfg, seed=1)
    first, last = build(cfg, seed=1), build(cfg, seed=1)
    del first.layers["1"]
    first.norm = first.output = None
    del last.layers["0"]
    last.tok_embeddings = last.pos_embeddings = None
    x = tokens(cfg)
    with torch.no_grad():
        hidden = first(x)
        assert hidden.shape == (*x.shape, cfg.dim)
        torch.testing.assert_close(last(hidden), full(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Attention variants


def expand_kv(state: dict, cfg: ModelConfig, *, interleave: bool = True) -> dict:
    """GQA state dict -> MHA state dict, each kv head copied to the query heads of its group."""
    groups = cfg.num_heads // cfg.num_kv_heads
    out = dict(state)
    for name, weight in state.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = weight.view(cfg.num_kv_heads, cfg.head_dim, cfg.dim)
            heads = heads.repeat_interleave(groups, dim=0) if interleave else heads.repeat(groups, 1, 1)
            out[name] = heads.reshape(cfg.num_heads * cfg.head_dim, cfg.dim)
    return out


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_and_mqa_equal_mha_with_repeated_kv(num_kv_heads):
    cfg = tiny(num_heads=4, num_kv_heads=num_kv_heads, init_std=0.2)
    gqa = build(cfg, seed=5)
    mha = Transformer(dataclasses.replace(cfg, num_kv_heads=cfg.num_heads)).eval()
    mha.load_state_dict(expand_kv(gqa.state_dict(), cfg), strict=True)
    x = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), gqa(x), rtol=0, atol=1e-5)
        if num_kv_heads > 1:  # the head-to-group mapping matters: tiling instead of interleaving differs
            mha.load_state_dict(expand_kv(gqa.state_dict(), cfg, interleave=False), strict=True)
            assert (mha(x) - gqa(x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Positional schemes


@pytest.mark.parametrize("pos", POS_ENCODINGS)
def test_causal(pos):
    cfg = tiny(pos_encoding=pos, init_std=0.2)
    model = build(cfg, seed=2)
    x = tokens(cfg, seq=12)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees the change


def last_logit_shift_under_permutation(model: Transformer, cfg: ModelConfig) -> float:
    # One layer: the last query attends over per-token keys/values, so without positional
    # information a permutation of the earlier tokens cannot change its output.
    x = tokens(cfg, batch=1, seq=10, seed=3)
    perm = torch.cat([torch.randperm(9, generator=torch.Generator().manual_seed(0)), torch.tensor([9])])
    assert not torch.equal(x[:, perm], x)
    with torch.no_grad():
        return (model(x)[:, -1] - model(x[:, perm])[:, -1]).abs().max().item()


@pytest.mark.parametrize("pos", POS_ENCODINGS)
def test_position_matters(pos):
    cfg = tiny(pos_encoding=pos, num_layers=1, init_std=0.5)
    model = build(cfg, seed=4)
    assert last_logit_shift_under_permutation(model, cfg) > 1e-3

    # Control: the same construction with the positional information removed is invariant.
    nope = build(tiny(pos_encoding="rope", num_layers=1, init_std=0.5), seed=4)
    nope.rope_cos = nope.rope_sin = None
    assert last_logit_shift_under_permutation(nope, cfg) < 1e-5


def test_rope_preserves_norm_and_is_relative():
    head_dim, seq = 16, 40
    cos, sin = rope_tables(head_dim, seq, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, seq, 3, head_dim, generator=g)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(rotated[:, 0], x[:, 0])  # position 0 is the identity

    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    q_at = apply_rope(q.expand(1, seq, 1, head_dim), cos, sin)[0, :, 0]
    k_at = apply_rope(k.expand(1, seq, 1, head_dim), cos, sin)[0, :, 0]
    scores = q_at @ k_at.T  # scores[m, n] = <q at m, k at n>
    for offset in (0, 1, 3, 17):
        diagonal = torch.diagonal(scores, offset=-offset)  # m - n = offset
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=0, atol=1e-4)
    assert abs(scores[5, 2] - scores[5, 3]) > 1e-3  # and it does depend on the offset


def test_alibi_slopes_match_paper():
    expected = torch.tensor([1 / 2**i for i in range(1, 9)])
    assert torch.equal(alibi_slopes(8), expected)
    assert torch.equal(alibi_slopes(4), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]))
    # Not a power of two: the 8 base slopes, then every other slope of the 16-head sequence (the
    # reference implementation's get_slopes).
    expected_12 = [2 ** -(i + 1) for i in range(8)] + [2 ** -(0.5 + i) for i in range(4)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected_12), rtol=1e-6, atol=0)


def test_alibi_bias_values():
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, seq_len=3, offset=2)  # queries at positions 2..4, keys 0..4
    assert bias.shape == (4, 3, 5)
    assert bias[1, 0, 0].item() == pytest.approx(-slopes[1].item() * 2)
    assert bias[1, 2, 4].item() == 0.0
    assert bias[0, 0, 3].item() == float("-inf")


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    def __init__(self):
        self.k = self.v = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@pytest.mark.parametrize("pos", POS_ENCODINGS)
@pytest.mark.parametrize("chunks", [(5, 1, 1, 1, 1, 1, 1, 1), (4, 3, 1, 4)], ids=["token", "chunked"])
def test_kv_cache_decoding_matches_full_forward(pos, chunks):
    cfg = tiny(pos_encoding=pos, init_std=0.2)
    model = build(cfg, seed=6)
    x = tokens(cfg, seq=sum(chunks))
    caches = [KVCache() for _ in range(cfg.num_layers)]
    pieces, start = [], 0
    with torch.no_grad():
        full = model(x)
        for size in chunks:
            pieces.append(model(x[:, start : start + size], start_pos=start, kv_caches=caches))
            start += size
    assert caches[0].k.shape[2] == x.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Counts


def numel(model: Transformer) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def test_tied_embeddings_share_storage():
    cfg = tiny(tie_embeddings=True)
    tied = build(cfg)
    untied = build(dataclasses.replace(cfg, tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert numel(untied) - numel(tied) == cfg.vocab_size * cfg.dim
    assert count_params(untied.cfg) - count_params(cfg) == cfg.vocab_size * cfg.dim


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_embeddings=True),
        dict(pos_encoding="learned"),
        dict(pos_encoding="learned", tie_embeddings=True),
        dict(pos_encoding="alibi", num_kv_heads=1),
        dict(pos_encoding="sinusoidal", num_kv_heads=4, num_layers=3, ffn_dim=96),
    ],
)
def test_count_params_matches_numel(overrides):
    cfg = tiny(**overrides)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_params(cfg) == numel(model)
    embedding = cfg.vocab_size * cfg.dim + (cfg.max_seq_len * cfg.dim if cfg.pos_encoding == "learned" else 0)
    if not cfg.tie_embeddings:
        assert count_params(cfg, embedding=False) == numel(model) - embedding


LLAMA_1B = ModelConfig(
    vocab_size=100352, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_dim=8192, tie_embeddings=False
)


def test_llama_1b_counts():
    with torch.device("meta"):
        model = Transformer(LLAMA_1B)
    assert numel(model) == 1_384_187_904
    assert count_params(LLAMA_1B) == 1_384_187_904
    n_embedding = 205_520_896
    assert LLAMA_1B.vocab_size * LLAMA_1B.dim == n_embedding
    assert count_params(LLAMA_1B, embedding=False) == 1_384_187_904 - n_embedding
    flops = flops_per_token(LLAMA_1B, 2048)
    assert flops == 6 * (1_384_187_904 - n_embedding) + 12 * 16 * 2048 * 2048
    assert abs(flops - 7.877e9) / 7.877e9 < 1e-4
    # Tying leaves the output matmul (and its FLOPs) in place.
    tied = dataclasses.replace(LLAMA_1B, tie_embeddings=True)
    assert flops_per_token(tied, 2048) == flops


# ---------------------------------------------------------------------------------------------
# House rule 1: models/ holds no distributed code


def forbidden_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            modules = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and node.attr in ("distributed", "parallel"):
            modules = [ast.unparse(node)]
        for name in modules:
            parts = name.lstrip(".").split(".")
            if "distributed" in parts or "parallel" in parts:
                found.append(name)
    return found


def test_forbidden_uses_detects_distributed_code():
    assert forbidden_uses("import torch.distributed as dist")
    assert forbidden_uses("from torch import distributed")
    assert forbidden_uses("from torch.nn.parallel import DistributedDataParallel")
    assert forbidden_uses("from parallel.tp import apply_tp")
    assert forbidden_uses("import torch\nx = torch.distributed.get_rank()")
    assert not forbidden_uses('"""Nothing here imports torch.distributed."""\nimport torch\nfrom torch import nn')


def test_models_import_no_distributed_code():
    files = sorted((ROOT / "models").glob("*.py"))
    assert files
    offenders = {f.name: uses for f in files if (uses := forbidden_uses(f.read_text()))}
    assert not offenders, f"models/ must not use distributed or parallel code: {offenders}"
