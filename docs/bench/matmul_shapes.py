"""Times each linear layer's three matmuls (forward, input gradient, weight gradient) of the bench_1b shape
alone, in bf16, at one step's token count, to show which shapes sit under the matmul roof and by how much.
Usage (device call): python3 docs/bench/matmul_shapes.py [batch]   (default 24 sequences of 2048 tokens)
"""
import json
import sys

import torch
from triton.testing import do_bench  # mean ms per call, as docs/bench/sdpa_gqa.py times

DIM, FFN, KV, VOCAB, LAYERS, SEQ = 2048, 8192, 512, 100352, 16, 2048
# name -> (in_features, out_features, count per step)
LINEARS = {
    "wq": (DIM, DIM, LAYERS), "wk": (DIM, KV, LAYERS), "wv": (DIM, KV, LAYERS), "wo": (DIM, DIM, LAYERS),
    "w1": (DIM, FFN, LAYERS), "w3": (DIM, FFN, LAYERS), "w2": (FFN, DIM, LAYERS), "output": (DIM, VOCAB, 1),
    # fused alternatives, for comparison only
    "wkv": (DIM, 2 * KV, LAYERS), "wqkv": (DIM, DIM + 2 * KV, LAYERS), "w13": (DIM, 2 * FFN, LAYERS),
}


def main():
    tokens = int(sys.argv[1] if len(sys.argv) > 1 else 24) * SEQ
    roof = 778.4e12
    rows, totals = [], {}
    for name, (fan_in, fan_out, count) in LINEARS.items():
        x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, fan_out, device="cuda", dtype=torch.bfloat16)
        flops = 2 * tokens * fan_in * fan_out
        kinds = {
            "forward x@w.T": lambda: torch.nn.functional.linear(x, w),
            "dgrad dy@w": lambda: dy @ w,
            "wgrad dy.T@x": lambda: dy.t() @ x,
            "wgrad x.T@dy": lambda: x.t() @ dy,
            "wgrad fp32 out": lambda: torch.mm(dy.t(), x, out_dtype=torch.float32),
        }
        for kind, fn in kinds.items():
            try:
                ms = do_bench(fn)
            except Exception as error:  # out_dtype may be missing on this build
                print(f"{name:7s} {kind:15s} failed: {type(error).__name__}: {error}"[:200])
                continue
            tflops = flops / ms / 1e9
            excess = (ms - flops / roof * 1e3) * count
            rows.append({"name": name, "kind": kind, "tokens": tokens, "ms": ms, "tflops": tflops, "count": count,
                         "excess_ms_per_step": excess})
            print(f"{name:7s} {kind:15s} {ms:7.3f} ms  {tflops:6.1f} TFLOP/s  x{count}: {ms * count:7.2f} ms/step,"
                  f" {excess:6.2f} ms over the roof")
            if name in ("wq", "wk", "wv", "wo", "w1", "w3", "w2", "output") and kind in (
                    "forward x@w.T", "dgrad dy@w", "wgrad x.T@dy"):
                totals[kind] = totals.get(kind, 0.0) + ms * count
        del x, w, dy
        torch.cuda.empty_cache()
    print("separate projections, per step:", {k: round(v, 1) for k, v in totals.items()},
          "sum", round(sum(totals.values()), 1), "ms")
    with open("/tmp/bo/matmul_shapes.jsonl", "a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
