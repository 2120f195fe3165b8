"""FP8 training through torchao's float8 linears (tensorwise or rowwise dynamic scaling).

Converts the block linears whose shapes pay off; small or odd-shaped linears stay in bf16, and so
does the output layer unless asked (its logits feed the loss: torchtitan keeps it bf16). Must not
hold sharding: FSDP's float8 all-gather is only switched on here.
"""
from __future__ import annotations

import dataclasses

from torch import nn

# Below this size the casts cost more than the faster matmul saves (torchao's own guidance is ~4k).
MIN_FP8_DIM = 1024


def pays_off(in_features: int, out_features: int, min_dim: int = MIN_FP8_DIM) -> bool:
    """A linear of this shape gains from float8 (the planner prices by the same rule)."""
    return min(out_features, in_features) >= min_dim and in_features % 16 == 0 and out_features % 16 == 0


def should_convert(module: nn.Module, fqn: str, *, min_dim: int = MIN_FP8_DIM, output: bool = False) -> bool:
    if not isinstance(module, nn.Linear) or (fqn.endswith("output") and not output):
        return False
    out_features, in_features = module.weight.shape
    return pays_off(in_features, out_features, min_dim)


def apply_float8(model: nn.Module, *, recipe: str, fsdp_all_gather: bool, output: bool = False,
                 fast_accum: bool = False, min_dim: int = MIN_FP8_DIM) -> list[str]:
    """Swap eligible nn.Linear modules in place; returns the converted FQNs for the run log."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.config import Float8GemmConfig

    # Half the all-gather bytes of bf16; torchao offers it for the tensorwise recipe only.
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe),
                                 enable_fsdp_float8_all_gather=recipe == "tensorwise" and fsdp_all_gather)
    if fast_accum:  # the recipes keep the gradient matmuls' accumulation exact; this trades it for speed
        config = dataclasses.replace(config, gemm_config_grad_input=Float8GemmConfig(use_fast_accum=True),
                                     gemm_config_grad_weight=Float8GemmConfig(use_fast_accum=True))

    def chosen(module: nn.Module, fqn: str) -> bool:
        return should_convert(module, fqn, min_dim=min_dim, output=output)

    converted = [fqn for fqn, m in model.named_modules() if chosen(m, fqn)]
    convert_to_float8_training(model, config=config, module_filter_fn=chosen)
    return converted


def describe_converted(fqns: list[str]) -> str:
    """'layers.{0..15}.{attention.wq, ...}' style summary of converted modules, for the run log."""
    if not fqns:
        return "none (no linear large enough)"
    layers = sorted({int(f.split(".")[1]) for f in fqns if f.startswith("layers.")})
    suffixes = sorted({f.split(".", 2)[2] for f in fqns if f.startswith("layers.")})
    others = [f for f in fqns if not f.startswith("layers.")]
    span = f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0])
    described = [f"layers.{{{span}}}.{{{', '.join(suffixes)}}}"] if layers else []
    return ", ".join(described + others)
