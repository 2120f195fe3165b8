"""Plain single-device models. Nothing here imports torch.distributed or parallel/."""
from models.llama import ModelConfig, Transformer, count_params, flops_per_token

__all__ = ["ModelConfig", "Transformer", "count_params", "flops_per_token"]
