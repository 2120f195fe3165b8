"""Cost estimates for the roofline report: the FLOPs and bytes of one profiled op, from the shapes and
dtypes torch.profiler records (record_shapes), and the optimizer's per-step work, from its parameters.

- FLOPs: torch.utils.flop_counter's formulas for matmuls; for attention the executed FLOPs over the
  full (not causal) square, as models.flops_per_token counts it, but with the backward's score
  recompute (forward 4 b h s^2 d, backward 10 b h s^2 d, where flops_per_token has 12 in all); one
  FLOP per element of the largest input for anything else. `get_dtype` says which roof (fp8, bf16,
  fp32) an op's FLOPs run against.
- Bytes moved: inputs plus outputs from the same shapes and dtypes: matmul A + B + C; attention q,
  k, v and the output(s); other ops their inputs plus an output the size of the largest input (none
  for reductions, the written input for in-place ops); Triton kernels the sum of their arguments
  (inputs and outputs alike). A lower bound on traffic: cache misses and re-reads are not seen.
- The optimizer class's FLOPs and bytes (`get_optimizer_work`) come from the parameters, not the
  trace: its kernels run over tensor lists, whose shapes the GPU trace lacks. Per element of a
  parameter (tensors of its dtype moved; FLOPs): the AdamW step, one fused pass, reads param, grad,
  exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq (7; 15 FLOPs: decay 2, exp_avg 3,
  exp_avg_sq 4, denominator sqrt/div/add 3, update 3); gradient clipping's kernels, in this class by
  their _foreach_/multi_tensor_apply names: _foreach_norm (and its lpnorm_cleanup) every step,
  reading each grad (1; square and add 2), and, with optim.grad_clip > 0, _foreach_mul_, reading
  and writing it (2; 1 FLOP). CPU's foreach AdamW makes several passes: its time shows them, its
  bytes count one. Every step is assumed to update (no skipped steps).

Must not hold trace reading, the kernel classes, the device timeline or which ops are counted
(trainer/trace_analysis.py), the roofs (trainer/roofs.py) or the report (trainer/roofline.py).
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import flop_registry

from trainer.optim import get_stepping_optimizer

# Copies and fills: bytes, no FLOPs (on CPU also their own class, trainer/trace_analysis.py).
CPU_COPIES = {"aten::copy_", "aten::clone", "aten::fill_", "aten::zero_"}
# Ops that move no data themselves: views, allocations, metadata, and composites whose copy is a child op.
VIEW_OPS = {"aten::" + name for name in (
    "empty", "empty_strided", "empty_like", "as_strided", "view", "_unsafe_view", "reshape", "t", "transpose",
    "permute", "expand", "slice", "select", "narrow", "unsqueeze", "squeeze", "flatten", "split", "chunk",
    "unbind", "detach", "alias", "resolve_conj", "resolve_neg", "lift_fresh", "result_type", "to", "type_as",
    "view_as", "split_with_sizes", "set_", "resize_", "contiguous")}
MATMUL_OPERANDS = {"mm": 2, "bmm": 2, "addmm": 3, "baddbmm": 3}
# Reductions write a small output: only their inputs count as traffic.
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "norm", "linalg_vector_norm", "_foreach_norm", "var", "std",
              "logsumexp", "argmax", "argmin", "all", "any", "nll_loss_forward"}
ITEMSIZE = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4, "short int": 2,
            "bool": 1, "signed char": 1, "unsigned char": 1, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1,
            "c10::Float8_e4m3fnuz": 1, "c10::Float8_e5m2fnuz": 1, "c10::complex<float>": 8, "TensorList": 4}
META_DTYPES = {"float": torch.float32, "double": torch.float64, "c10::BFloat16": torch.bfloat16,
               "c10::Half": torch.float16, "long int": torch.int64, "int": torch.int32, "bool": torch.bool}
FP8_TYPES = ("Float8",)
# The optimizer class's work per parameter element (module docstring): (tensors moved, FLOPs).
OPTIMIZER_PARTS = {"adamw": (7, 15), "grad_norm": (1, 2), "grad_scale": (2, 1)}


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes from recorded shapes


def _is_tensor(kind: str) -> bool:
    return kind in ITEMSIZE


def _numel(dims) -> int:
    if dims and isinstance(dims[0], list):  # a TensorList
        return sum(_numel(d) for d in dims)
    return math.prod(dims) if dims else 1


def _tensor_bytes(dims, kind: str) -> int:
    return _numel(dims) * ITEMSIZE.get(kind, 4)


def _meta_args(dims: list, kinds: list) -> list:
    """Meta tensors of the recorded shapes (formulas read .shape), None for everything else."""
    args = []
    for d, kind in zip(dims, kinds):
        if kind == "TensorList":
            args.append([torch.empty(x, device="meta") for x in d])
        elif _is_tensor(kind):
            args.append(torch.empty(d, device="meta", dtype=META_DTYPES.get(kind, torch.float32)))
        else:
            args.append(None)
    return args


def _attention_flops(name: str, dims: list, kinds: list) -> float:
    """Executed attention FLOPs over the full (not causal) square: forward QK^T and PV, backward the
    four gradient matmuls plus the score recompute of flash kernels (2.5x forward, as torch 2.13's
    FlopCounterMode). Own formula: the registry's differs across torch versions and lacks the CPU kernels."""
    tensors = [d for d, kind in zip(dims, kinds) if _is_tensor(kind)]
    q, k, v = tensors[1:4] if "backward" in name else tensors[0:3]
    scores = 2 * math.prod(q[:-1]) * k[-2]  # 2 x (batch x heads x queries) x keys, per unit of head dim
    return scores * (3 * q[-1] + 2 * v[-1]) if "backward" in name else scores * (q[-1] + v[-1])


@functools.lru_cache(maxsize=None)
def has_formula(name: str) -> bool:
    if not name.startswith("aten::"):
        return False
    return "attention" in name or getattr(torch.ops.aten, name[6:], None) in flop_registry


def get_flops(name: str, args: dict) -> float:
    dims, kinds = args.get("Input Dims", []), args.get("Input type", [])
    if "kernel_flop" in args:
        return float(args["kernel_flop"])
    if has_formula(name) and "attention" in name:
        try:
            return float(_attention_flops(name, dims, kinds))
        except (IndexError, TypeError, ValueError):  # an attention op of another signature: not counted
            return 0.0
    if has_formula(name):
        formula = flop_registry[getattr(torch.ops.aten, name[6:])]
        meta = _meta_args(dims, kinds)
        leading = meta[:next((i for i, a in enumerate(meta) if a is None), len(meta))]
        for attempt in (meta, leading):  # some formulas take the leading tensors only (addmm's beta, alpha)
            try:
                return float(formula(*attempt))
            except Exception:  # noqa: BLE001 - an unexpected signature counts as no formula
                continue
        return 0.0
    if name in VIEW_OPS or name in CPU_COPIES:
        return 0.0
    sizes = [_numel(d) for d, kind in zip(dims, kinds) if _is_tensor(kind)]
    return float(max(sizes, default=0))


def get_bytes(name: str, args: dict) -> float:
    if "kernel_num_gb" in args:
        return float(args["kernel_num_gb"]) * 1e9
    dims, kinds = args.get("Input Dims", []), args.get("Input type", [])
    tensors = [(d, kind) for d, kind in zip(dims, kinds) if _is_tensor(kind)]
    inputs = sum(_tensor_bytes(d, kind) for d, kind in tensors)
    if not tensors or name in VIEW_OPS:
        return 0.0
    if not name.startswith("aten::"):  # a Triton kernel: its arguments are its inputs and outputs
        return float(inputs)
    op = name[6:]
    if op in ("mm", "_scaled_mm", "addmm", "bmm", "baddbmm") and len(tensors) >= 2:
        a, b = (tensors[1][0], tensors[2][0]) if op in ("addmm", "baddbmm") else (tensors[0][0], tensors[1][0])
        if len(tensors) > MATMUL_OPERANDS.get(op, len(tensors)):  # out= given (inductor's extern mm): already counted
            return float(inputs)
        out_numel = math.prod(a[:-1]) * b[-1]
        out_size = 2 if op == "_scaled_mm" else ITEMSIZE.get(tensors[0][1], 4)
        return float(inputs + out_numel * out_size)
    if "attention" in op:
        q, k, v = tensors[1:4] if "backward" in op else tensors[0:3]
        written = sum(_tensor_bytes(*t) for t in (q, k, v)) if "backward" in op else _tensor_bytes(*q)
        return float(inputs + written)
    if op in ("copy_", "fill_", "zero_"):
        return float(inputs)
    if op.endswith("_"):
        return float(inputs + _tensor_bytes(*tensors[0]))
    if op in REDUCTIONS:
        return float(inputs)
    return float(inputs + max(_tensor_bytes(*t) for t in tensors))


def get_dtype(args: dict) -> str:
    kinds = [k for k in args.get("Input type", []) if _is_tensor(k)]
    if any(any(f in k for f in FP8_TYPES) for k in kinds):
        return "fp8"
    if any(k in ("c10::BFloat16", "c10::Half") for k in kinds):
        return "bf16"
    return "fp32"


# ---------------------------------------------------------------------------------------------
# The optimizer's work, from its parameters


@dataclass
class OptimizerWork:
    """Per-step FLOPs and bytes of the optimizer class's kernels, by part (OPTIMIZER_PARTS' keys)."""

    flops: dict[str, float]
    bytes: dict[str, float]
    flops_by_dtype: dict[str, float]


def get_optimizer_work(optimizer: torch.optim.Optimizer, *, grad_clip: bool) -> OptimizerWork:
    """The work of one step of `optimizer` (this rank's shards) and of the gradient norm and clipping
    before it (`grad_clip`: the grads are scaled in a pass of their own; ClippedAdamW scales them on the fly)."""
    def local(groups):
        return [p.to_local() if isinstance(p, DTensor) else p for group in groups for p in group["params"]]

    # Under ZeRO-1 every gradient is clipped, but a ZeroRedundancyOptimizer steps only its partition.
    stepped = local(get_stepping_optimizer(optimizer).param_groups)
    clipped = local(optimizer.param_groups)
    parts = {"adamw": stepped, "grad_norm": clipped, "grad_scale": clipped if grad_clip else []}
    work = OptimizerWork({}, {}, defaultdict(float))
    for part, params in parts.items():
        tensors, flops = OPTIMIZER_PARTS[part]
        work.bytes[part] = float(sum(tensors * p.numel() * p.element_size() for p in params))
        work.flops[part] = float(sum(flops * p.numel() for p in params))
        for p in params:
            work.flops_by_dtype["bf16" if p.element_size() == 2 else "fp32"] += flops * p.numel()
    return work
