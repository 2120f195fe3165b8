"""Times one optimizer step of the 1B model's parameters (fp32, 1.384B) alone, clipping included:
the trainer's clip (norm, then a scaling pass) + fused AdamW, against one torch.compile'd function that
computes the norm and runs AdamW (torch.optim.adam.adam, foreach) on the clipped gradients without writing
them back. Usage (device call): python3 docs/bench/optimizer_step.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import torch  # noqa: E402
import yaml  # noqa: E402
from torch.optim.adam import adam  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from models.llama import ModelConfig, Transformer  # noqa: E402
from parallel.grad_norm import clip_grad_norm_  # noqa: E402
from trainer.optim import get_param_groups  # noqa: E402

BETAS, EPS, WEIGHT_DECAY, MAX_NORM = (0.9, 0.95), 1e-8, 0.1, 1.0


@torch.compile
@torch.no_grad()
def compiled_clip_and_step(groups, lr, max_norm):
    grads = [g for group in groups for g in group["grads"]]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for group in groups:
        adam(group["params"], torch._foreach_mul(group["grads"], coef), group["exp_avgs"], group["exp_avg_sqs"], [],
             group["steps"], foreach=True, capturable=True, decoupled_weight_decay=True, amsgrad=False,
             beta1=BETAS[0], beta2=BETAS[1], lr=lr, weight_decay=group["weight_decay"], eps=EPS, maximize=False)
    return norm


def main():
    cfg = yaml.safe_load(open(Path(__file__).resolve().parents[2] / "configs/model/llama_1b.yaml"))
    with torch.device("meta"):
        model = Transformer(ModelConfig(**cfg))
    model = model.to_empty(device="cuda")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
        p.grad = torch.randn_like(p) * 1e-4
    param_groups = get_param_groups([model], WEIGHT_DECAY)
    params = [p for group in param_groups for p in group["params"]]
    print(f"{sum(p.numel() for p in params) / 1e9:.3f}B parameters in {len(params)} tensors")

    fused = torch.optim.AdamW(param_groups, lr=3e-4, betas=BETAS, eps=EPS, fused=True)

    def trainer_step():
        clip_grad_norm_(params, MAX_NORM)
        fused.step()

    groups = [{"params": g["params"], "grads": [p.grad for p in g["params"]],
               "exp_avgs": [torch.zeros_like(p) for p in g["params"]],
               "exp_avg_sqs": [torch.zeros_like(p) for p in g["params"]],
               "steps": [torch.zeros((), device="cuda") for _ in g["params"]],
               "weight_decay": g["weight_decay"]} for g in param_groups]
    lr = torch.tensor(3e-4, device="cuda")
    compiled_clip_and_step(groups, lr, MAX_NORM)  # compile outside the timing
    n = sum(p.numel() for p in params)
    # The floor: read p, g, m, v and write p, m, v (28 B) plus the norm's read of g (4 B) per parameter.
    floor_gb = 32 * n / 1e9
    for name, fn in {"clip pass + fused AdamW (trainer)": trainer_step,
                     "fused AdamW alone (no clip)": fused.step,
                     "compiled norm + AdamW on clipped grads": lambda: compiled_clip_and_step(groups, lr, MAX_NORM)}.items():
        ms = do_bench(fn, warmup=50, rep=500)
        print(f"{name:40s} {ms:7.2f} ms  ({floor_gb / ms:5.2f} TB/s against the {floor_gb:.1f} GB floor)")


if __name__ == "__main__":
    main()
