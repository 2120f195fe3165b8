"""Causal SDPA forward+backward at the bench_1b shape (32 query heads, 8 kv heads, head dim 64, seq 2048),
per backend: kv heads repeated to 32 (repeat_interleave, as the model does) or SDPA's own enable_gqa, and
inputs laid out as the model makes them ((batch, seq, heads, dim) transposed) or contiguous.
Run on the GPU: `python3 docs/bench/sdpa_gqa.py [batch]`."""
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

warnings.filterwarnings("ignore")
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8


def make(heads: int, model_layout: bool) -> torch.Tensor:
    shape = (batch, 2048, heads, 64) if model_layout else (batch, heads, 2048, 64)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return x


def run(model_layout: bool, gqa: str):
    q, k, v = make(32, model_layout), make(8, model_layout), make(8, model_layout)

    def step():
        qq, kk, vv = (t.transpose(1, 2) for t in (q, k, v)) if model_layout else (q, k, v)
        if gqa == "repeat_interleave":
            kk, vv = kk.repeat_interleave(4, 1), vv.repeat_interleave(4, 1)
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        out.sum().backward()

    return step


for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
    for model_layout in (True, False):
        for gqa in ("repeat_interleave", "enable_gqa"):
            label = f"{name:8s} {'model layout' if model_layout else 'contiguous  '} {gqa:17s}"
            try:
                with sdpa_kernel(backend) if backend is not None else torch.enable_grad():
                    ms = do_bench(run(model_layout, gqa))
                print(f"{label} {ms:7.3f} ms (x16 layers: {16 * ms:6.1f} ms/step)", flush=True)
            except RuntimeError as exc:
                print(f"{label} unsupported: {str(exc).splitlines()[0][:80]}", flush=True)
