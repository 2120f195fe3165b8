"""A Llama-style decoder as plain single-device nn.Modules.

Holds the model config, the layers (RMSNorm, SwiGLU, SDPA attention with MHA/GQA/MQA), the four
positional schemes, seeded per-parameter initialisation, and parameter/FLOP counts. Must not hold
any distributed code: tensor, pipeline and data parallelism are applied from parallel/.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.loss import LinearCrossEntropy


@dataclass
class ModelConfig:
    vocab_size: int = 384
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 8
    ffn_dim: int = 688
    norm_eps: float = 1e-5
    pos_encoding: str = "rope"  # rope | alibi | sinusoidal | learned
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# --------------------------------------------------------------------------------------------
# Positional encodings. RoPE uses the half-split (rotate_half) layout of Hugging Face's Llama, so
# exported weights need no permutation.


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al.'s geometric slopes, extended by interleaving when heads are not a power of two."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Additive attention bias (heads, seq, offset + seq): -slope * distance, -inf above the diagonal."""
    q_pos = torch.arange(offset, offset + seq_len, device=slopes.device)[:, None]
    k_pos = torch.arange(offset + seq_len, device=slopes.device)[None, :]
    distance = (q_pos - k_pos).float()
    bias = -slopes[:, None, None] * distance
    return bias.masked_fill(distance < 0, float("-inf"))


def sinusoidal_table(max_seq_len: int, dim: int, device=None) -> torch.Tensor:
    position = torch.arange(max_seq_len, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_seq_len, dim, device=device)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


# --------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.RMSNorm):
    """Scales in the input's dtype: under autocast a bf16 input with the fp32 weight would miss the fused kernel
    (FSDP's bf16 parameters match already)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, rope=None, attn_bias=None, kv_cache=None):
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism these are the local heads; the model never sees the degree.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        # GQA/MQA inside SDPA: kv heads are shared, not copied (faster, and nothing expanded is saved).
        gqa = q.shape[1] != k.shape[1]
        if attn_bias is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), enable_gqa=gqa)
        elif kv_cache is not None and seq != k.shape[2]:
            # Decoding with a cache: queries sit at the end, so the causal mask is bottom-right aligned.
            mask = torch.ones(seq, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - seq)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope=None, attn_bias=None, kv_cache=None):
        x = x + self.attention(self.attention_norm(x), rope, attn_bias, kv_cache)
        return x + self.feed_forward(self.ffn_norm(x))


def to_compute_dtype(h: torch.Tensor) -> torch.Tensor:
    """The residual stream in autocast's dtype, as FSDP's bf16 parameters and Megatron-LM run it. The embedding's
    fp32 output would otherwise keep every residual add and norm in fp32: twice the bytes of the elementwise work."""
    device_type = h.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return h.to(torch.get_autocast_dtype(device_type))
    return h


class Transformer(nn.Module):
    """Decoder-only LM. Embedding, final norm and output are optional (None) so a pipeline stage can
    drop what it does not own; layers are keyed "0".."N-1" so names match in every layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos_encoding == "learned" else None
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.loss = LinearCrossEntropy()
        # Derived tables, recomputed by init_buffers() after materialisation; never checkpointed.
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("alibi_slopes", None, persistent=False)
        self.register_buffer("sinusoidal", None, persistent=False)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        cfg = self.cfg
        device = device or self.norm_device()
        if cfg.pos_encoding == "rope":
            self.rope_cos, self.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device)
        elif cfg.pos_encoding == "alibi":
            self.alibi_slopes = alibi_slopes(cfg.num_heads).to(device)
        elif cfg.pos_encoding == "sinusoidal":
            self.sinusoidal = sinusoidal_table(cfg.max_seq_len, cfg.dim, device)

    def norm_device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, tokens: torch.Tensor, *, targets: torch.Tensor | None = None, start_pos: int = 0,
                kv_caches=None) -> torch.Tensor:
        """tokens (batch, seq) of ids on the first stage, hidden states (batch, seq, dim) after it.

        Returns logits, or with `targets` the mean cross entropy fused with the output layer (the
        logits are never materialised)."""
        seq = tokens.shape[1]
        positions = slice(start_pos, start_pos + seq)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if self.pos_embeddings is not None and self.tok_embeddings is not None:
            h = h + self.pos_embeddings(torch.arange(start_pos, start_pos + seq, device=h.device))
        if self.sinusoidal is not None and self.tok_embeddings is not None:
            h = h + self.sinusoidal[positions].to(h.dtype)
        if self.tok_embeddings is not None:
            h = to_compute_dtype(h)
        rope = (self.rope_cos[positions], self.rope_sin[positions]) if self.rope_cos is not None else None
        attn_bias = alibi_bias(self.alibi_slopes, seq, start_pos) if self.alibi_slopes is not None else None
        for name, layer in self.layers.items():
            h = layer(h, rope, attn_bias, kv_caches[int(name)] if kv_caches is not None else None)
        h = self.norm(h) if self.norm is not None else h
        if self.output is None:
            return h
        return self.output(h) if targets is None else self.loss(h, self.output.weight, targets)

    # ----------------------------------------------------------------------------------------
    # Initialisation: each parameter is drawn from its own generator seeded by (seed, name), so
    # the values do not depend on how the model is split, sharded or placed.

    def init_std(self, name: str) -> float | None:
        """Standard deviation of a parameter's normal init; None means ones (norm weights)."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        return self.cfg.init_std

    def initial_value(self, name: str, shape: torch.Size, seed: int, device) -> torch.Tensor:
        std = self.init_std(name)
        if std is None:
            return torch.ones(shape, device=device)
        generator = torch.Generator(device=device).manual_seed(param_seed(seed, name))
        return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)

    def tie_weights(self) -> None:
        """Point the output layer at the embedding table when tied. Module.to_empty() gives each module its own new
        tensor, so a model built on meta comes back untied: call this after it."""
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        self.tie_weights()
        for name, param in self.named_parameters():
            param.copy_(self.initial_value(name, param.shape, seed, param.device))
        self.init_buffers()


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


# --------------------------------------------------------------------------------------------
# Counts


def count_params(cfg: ModelConfig, *, embedding: bool = True) -> int:
    """Parameters of the full model. embedding=False leaves out the input (and learned position)
    embedding tables but keeps a separate output layer, as in Kaplan/Chinchilla accounting."""
    d, kv = cfg.dim, cfg.num_kv_heads * cfg.head_dim
    attention = d * d * 2 + d * kv * 2
    ffn = 3 * d * cfg.ffn_dim
    block = attention + ffn + 2 * d
    embeddings = cfg.vocab_size * d + (cfg.max_seq_len * d if cfg.pos_encoding == "learned" else 0)
    output = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = cfg.num_layers * block + d + output
    if cfg.tie_embeddings and not embedding:
        return total + cfg.vocab_size * d  # the tied table still does the output matmul
    return total + (embeddings if embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 (N - N_embedding) + 12 L d seq.

    6N covers forward (2N) and backward (4N) matmuls over all non-embedding weights (the output
    layer included); 12 L d seq is attention's QK^T and AV, counted over the full square (not
    causal), as PaLM's appendix B and the peer trainers do. Recomputation is not counted.
    """
    return 6 * count_params(cfg, embedding=False) + 12 * cfg.num_layers * cfg.dim * seq_len
