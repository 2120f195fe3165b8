"""A/B for the fused loss's per-chunk kernel: runs `trainer.bench` with `models.loss.get_logits_grad` patched
back to the scatter formulation (the earlier code). Same arguments as `python -m trainer.bench`; use it with
train.fused_loss=true."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import torch  # noqa: E402

import models.loss  # noqa: E402


def get_logits_grad_scatter(logits, targets, scale):
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)
    target_logits = logits32.gather(-1, targets[:, None]).squeeze(-1)
    grad = torch.exp(logits32 - lse[:, None])
    grad.scatter_add_(-1, targets[:, None], torch.full_like(target_logits[:, None], -1.0))
    return (lse - target_logits).sum(), (grad * scale).to(logits.dtype)


models.loss.get_logits_grad = get_logits_grad_scatter

if __name__ == "__main__":
    from trainer.bench import main

    sys.exit(main(sys.argv[1:]))
