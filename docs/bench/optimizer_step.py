"""Times one optimizer step of the 1B model's parameters (fp32, 1.384B) alone, clipping included: the trainer's
two paths, clip_grad_norm_ (norm, then a scaling pass) + fused AdamW, and get_grad_norm + ClippedAdamW
(optim.compile=true: the clip applied inside one compiled update per parameter).
Usage (device call): python3 docs/bench/optimizer_step.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import torch  # noqa: E402
import yaml  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from models.llama import ModelConfig, Transformer  # noqa: E402
from parallel.grad_norm import clip_grad_norm_, get_grad_norm  # noqa: E402
from trainer.optim import ClippedAdamW, get_param_groups  # noqa: E402

BETAS, EPS, WEIGHT_DECAY, MAX_NORM = (0.9, 0.95), 1e-8, 0.1, 1.0


def main():
    cfg = yaml.safe_load(open(Path(__file__).resolve().parents[2] / "configs/model/llama_1b.yaml"))
    with torch.device("meta"):
        model = Transformer(ModelConfig(**cfg))
    model = model.to_empty(device="cuda")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
        p.grad = torch.randn_like(p) * 1e-4
    params = list(model.parameters())
    print(f"{sum(p.numel() for p in params) / 1e9:.3f}B parameters in {len(params)} tensors")
    fused = torch.optim.AdamW(get_param_groups([model], WEIGHT_DECAY), lr=3e-4, betas=BETAS, eps=EPS, fused=True)
    clipped = ClippedAdamW(get_param_groups([model], WEIGHT_DECAY), max_norm=MAX_NORM, lr=3e-4, betas=BETAS, eps=EPS)

    def fused_step():
        clip_grad_norm_(params, MAX_NORM)
        fused.step()

    def clipped_step():
        clipped.grad_norm = get_grad_norm(params)
        clipped.step()

    clipped_step()  # compile outside the timing
    # The floor: read p, g, m, v and write p, m, v (28 B) plus the norm's read of g (4 B) per parameter.
    floor_gb = 32 * sum(p.numel() for p in params) / 1e9
    for name, fn in {"clip pass + fused AdamW": fused_step, "fused AdamW alone (no clip)": fused.step,
                     "get_grad_norm + ClippedAdamW": clipped_step}.items():
        ms = do_bench(fn, warmup=50, rep=500)
        print(f"{name:32s} {ms:7.2f} ms  ({floor_gb / ms:5.2f} TB/s against the {floor_gb:.1f} GB floor)")


if __name__ == "__main__":
    main()
