"""Checks on the GPU that the fused loss's gradients match the logits path's, with its default chunks and with
one chunk, on the bench_1b shape (4 layers, random init, bf16 autocast, compiled loss kernels as in training).
Usage (device call): python3 docs/bench/check_fused_loss.py [batch]   (default 24 sequences of 2048 tokens)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import torch  # noqa: E402

import models.loss  # noqa: E402
from models import ModelConfig, Transformer  # noqa: E402
from trainer.train import cross_entropy_loss  # noqa: E402


def main():
    batch = int(sys.argv[1] if len(sys.argv) > 1 else 24)
    cfg = ModelConfig(vocab_size=100352, dim=2048, num_layers=4, num_heads=32, num_kv_heads=8, ffn_dim=8192,
                      rope_theta=500000.0, max_seq_len=2048)
    with torch.device("cuda"):
        model = Transformer(cfg)
    model.init_weights(0)
    model.loss.compile_kernel()
    tokens = torch.randint(0, cfg.vocab_size, (batch, 2049), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    compiled_ce = torch.compile(cross_entropy_loss)

    def run(name, loss_fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        norm = torch.sqrt(sum(g.square().sum() for g in grads.values())).item()
        print(f"{name:24s} loss {loss.item():.6f}  grad norm {norm:.6f}")
        return grads

    reference = run("logits path", lambda: compiled_ce(model(inputs), targets))
    runs = {"fused, default chunks": None, "fused, one chunk": 2**33}
    for name, chunk_elements in runs.items():
        if chunk_elements:
            models.loss.CHUNK_ELEMENTS = chunk_elements
        grads = run(name, lambda: model(inputs, targets=targets))
        for param in ("output.weight", "tok_embeddings.weight", "layers.0.feed_forward.w1.weight", "norm.weight"):
            a, b = grads[param].flatten(), reference[param].flatten()
            cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
            print(f"    {param:34s} norm ratio {a.norm().item() / b.norm().item():.5f}  cosine {cosine:.6f}")


if __name__ == "__main__":
    main()
