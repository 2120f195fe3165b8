"""FP8 training through torchao's float8 linears (tensorwise or rowwise dynamic scaling).

Converts the block linears whose shapes pay off; the output layer and small or odd-shaped
linears stay in bf16. Must not hold sharding: FSDP's float8 all-gather is only switched on here.
"""
from __future__ import annotations

from torch import nn

# Below this size the casts cost more than the faster matmul saves (torchao's own guidance is ~4k).
MIN_FP8_DIM = 1024


def should_convert(module: nn.Module, fqn: str, *, min_dim: int = MIN_FP8_DIM) -> bool:
    if not isinstance(module, nn.Linear) or fqn.endswith("output"):
        return False
    out_features, in_features = module.weight.shape
    return min(out_features, in_features) >= min_dim and in_features % 16 == 0 and out_features % 16 == 0


def apply_float8(model: nn.Module, *, recipe: str, fsdp: bool, min_dim: int = MIN_FP8_DIM) -> list[str]:
    """Swap eligible nn.Linear modules in place; returns the converted FQNs for the run log."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp:
        config.enable_fsdp_float8_all_gather = True
    converted = [fqn for fqn, m in model.named_modules() if should_convert(m, fqn, min_dim=min_dim)]
    for fqn, module in model.named_modules():
        # A fused projection would read the weights directly and bypass the float8 linears' forward.
        if hasattr(module, "fuse_projections") and any(c.startswith(fqn + ".") for c in converted):
            module.fuse_projections = False
    convert_to_float8_training(model, config=config,
                               module_filter_fn=lambda m, fqn: should_convert(m, fqn, min_dim=min_dim))
    return converted
