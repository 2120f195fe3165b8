"""Causal SDPA forward+backward at the bench_1b shape (32 query heads, 8 kv heads, head dim 64, seq 2048):
kv heads repeated to 32 (repeat_interleave, as the model does) against SDPA's own enable_gqa, per backend.
Run on the GPU: `python3 docs/bench/sdpa_gqa.py [batch]`."""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
q = torch.randn(batch, 32, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(batch, 8, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn_like(k, requires_grad=True)


def repeated():
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    out.sum().backward()


def native():
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.sum().backward()


for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                      ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
    for label, fn in [("repeat_interleave", repeated), ("enable_gqa", native)]:
        try:
            if backend is None:
                ms = do_bench(fn)
            else:
                with sdpa_kernel(backend):
                    ms = do_bench(fn)
            print(f"{name:9s} {label:17s} {ms:7.3f} ms (x16 layers: {16 * ms:6.1f} ms/step)")
        except RuntimeError as exc:
            print(f"{name:9s} {label:17s} unsupported: {str(exc).splitlines()[0][:100]}")
