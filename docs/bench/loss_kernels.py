"""Times the loss on one step's logits alone (bf16, tokens x 100352), forward and backward:
the compiled cross entropy the trainer uses on logits, against the fused loss's compiled per-chunk kernel
(loss and logits gradient at once) on the whole batch.
Usage (device call): python3 docs/bench/loss_kernels.py [batch]   (default 24 sequences of 2048 tokens)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402  (mean ms per call, as docs/bench/sdpa_gqa.py times)

from models.loss import get_logits_grad  # noqa: E402
from trainer.train import cross_entropy_loss  # noqa: E402


def main():
    tokens, vocab = int(sys.argv[1] if len(sys.argv) > 1 else 24) * 2048, 100352
    logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    gbytes = logits.numel() * 2 / 1e9
    compiled_ce = torch.compile(cross_entropy_loss)

    def logits_path():
        logits.grad = None
        compiled_ce(logits[None], targets[None]).backward()

    fused_kernel = torch.compile(get_logits_grad, dynamic=False)
    for name, fn in {"compiled cross entropy, fwd+bwd": logits_path,
                     "fused-loss kernel, loss+grad": lambda: fused_kernel(logits.detach(), targets, 1.0 / tokens)}.items():
        ms = do_bench(fn)
        # The floor: read the logits once for the loss, once more for the gradient, write the gradient.
        print(f"{name:34s} {ms:7.2f} ms  ({3 * gbytes / ms:5.2f} TB/s if it moved 3x the {gbytes:.1f} GB of logits)")


if __name__ == "__main__":
    main()
