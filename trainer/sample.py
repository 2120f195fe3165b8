"""Text generation from a checkpoint, with a KV cache.

`python -m trainer.sample checkpoint=PATH prompt="..." [max_new_tokens=200] [temperature=0.8] [top_k=0] [seed=0]
[device=auto] [use_cache=true]` loads the checkpoint's model on one device (PATH: a checkpoint folder, or a run dir
for its newest), encodes the prompt with the run's tokenizer and prints the continuation. temperature=0 is greedy;
top_k=0 keeps every token. Generation stops at the tokenizer's end-of-text token or after max_new_tokens.
Must not hold model code (the model takes `kv_caches` and `start_pos`) or checkpoint reading.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from models import Transformer
from trainer.config import Config, ConfigError, print_help


class KVCache:
    """One layer's keys and values, (batch, kv_heads, positions, head_dim), in buffers of max_len positions
    allocated on the first update; `update` appends and returns everything cached so far."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.keys = self.values = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys = k.new_zeros(shape)
            self.values = v.new_zeros(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def build_kv_caches(model: Transformer, max_len: int) -> list[KVCache]:
    return [KVCache(max_len) for _ in range(model.cfg.num_layers)]


def get_next_token(logits: torch.Tensor, *, temperature: float, top_k: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch, 1) ids: argmax at temperature 0, else a draw from the top_k softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, eos_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """prompt (batch, seq) ids -> the new ids (batch, <= max_new_tokens). With use_cache=False every step
    re-runs the whole sequence (the reference the cached path must match)."""
    total = prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ConfigError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens={max_new_tokens} = {total}:"
                          f" beyond model.max_seq_len={model.cfg.max_seq_len}")
    caches = build_kv_caches(model, total) if use_cache else None
    tokens, new = prompt, []
    logits = model(prompt, start_pos=0, kv_caches=caches)[:, -1]
    for _ in range(max_new_tokens):
        next_id = get_next_token(logits, temperature=temperature, top_k=top_k, generator=generator)
        new.append(next_id)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break
        if len(new) == max_new_tokens:
            break
        if use_cache:
            logits = model(next_id, start_pos=tokens.shape[1], kv_caches=caches)[:, -1]
        else:
            logits = model(torch.cat([tokens, next_id], dim=1))[:, -1]
        tokens = torch.cat([tokens, next_id], dim=1)
    return torch.cat(new, dim=1) if new else prompt[:, :0]


def get_tokenizer(cfg: Config, checkpoint: Path):
    """The run's tokenizer: byte, or the BPE saved beside the checkpoint (else in its run dir); never a new one."""
    from trainer.data import build_tokenizer

    if cfg.data.tokenizer == "bpe":
        homes = [d for d in (checkpoint, checkpoint.parent.parent) if (d / "tokenizer.json").is_file()]
        if not homes:
            raise ConfigError(f"checkpoint {checkpoint}: data.tokenizer='bpe' but no tokenizer.json beside it or in its run dir")
        return build_tokenizer(cfg.data, homes[0], log=lambda *_: None)
    return build_tokenizer(cfg.data, None, log=lambda *_: None)


def main(argv: list[str]) -> int:
    if print_help(argv, __doc__):
        return 0
    from trainer.checkpoint import load_model
    from trainer.export import parse_args

    try:
        args = parse_args(argv, {"checkpoint": None, "prompt": "", "max_new_tokens": 200, "temperature": 0.8,
                                 "top_k": 0, "seed": 0, "device": "auto", "use_cache": "true"})
        if args["temperature"] < 0 or args["top_k"] < 0 or args["max_new_tokens"] < 1:
            raise ConfigError("temperature and top_k must be >= 0, max_new_tokens >= 1")
        if args["use_cache"] not in ("true", "false"):
            raise ConfigError(f"use_cache={args['use_cache']!r}: must be true or false")
        if args["device"] not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={args['device']!r}: must be one of ['auto', 'cpu', 'cuda']")
        device = torch.device("cuda" if args["device"] == "cuda" or (args["device"] == "auto" and torch.cuda.is_available()) else "cpu")
        model, cfg, path = load_model(args["checkpoint"], device)
        tokenizer = get_tokenizer(cfg, path)
        ids = tokenizer.encode(args["prompt"]) or [tokenizer.eos_id]  # an empty prompt starts a new document
        prompt = torch.tensor([ids], dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(args["seed"])
        new = generate(model, prompt, max_new_tokens=args["max_new_tokens"], temperature=args["temperature"],
                       top_k=args["top_k"], eos_id=tokenizer.eos_id, generator=generator,
                       use_cache=args["use_cache"] == "true")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args["prompt"] + tokenizer.decode(new[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
