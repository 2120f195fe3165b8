"""Cross entropy fused with the output layer, computed in chunks of tokens.

The full logits (tokens x vocab, the largest activation of a 100k-vocab model) are never held:
each chunk's logits are made, turned into that chunk's loss and gradients at once, and dropped.
Gradients are therefore computed during forward and scaled by the incoming gradient in backward,
which is exact because the loss is a scalar. Must not hold the model or any distributed code.
"""
from __future__ import annotations

import torch
from torch import nn

# Logits elements per chunk: 2**29 (1 GiB in bf16) keeps the transient small next to the model's activations.
CHUNK_ELEMENTS = 2**29


def get_logits_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and d(mean loss)/d(logits) of one chunk; fp32 inside, the gradient in the logits' dtype."""
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)
    target_logits = logits32.gather(-1, targets[:, None]).squeeze(-1)
    grad = (logits32 - lse[:, None]).exp_()
    # Softmax minus the one-hot target as a pointwise op: Inductor fuses it into one pass, not so a scatter.
    grad.add_(torch.arange(logits.shape[-1], device=logits.device) == targets[:, None], alpha=-1.0)
    return (lse - target_logits).sum(), grad.mul_(scale).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, logits_grad):
        # Compute in the autocast dtype when autocast is on, else in the inputs' dtype.
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            grad_hidden = torch.empty_like(h)
            grad_weight = None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            scale = 1.0 / h.shape[0]
            for start in range(0, h.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                chunk_loss, grad_logits = logits_grad(h[rows] @ w.t(), targets[rows], scale)
                loss += chunk_loss
                grad_hidden[rows] = grad_logits @ w
                chunk_grad_weight = grad_logits.t() @ h[rows]
                # Chunks sum in fp32; a single chunk is cast once, by backward's scaling.
                grad_weight = chunk_grad_weight if grad_weight is None else grad_weight.float().add_(chunk_grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden * grad_loss).to(hidden_dtype), (grad_weight.float() * grad_loss).to(weight_dtype), None, None, None


class LinearCrossEntropy(nn.Module):
    """Mean cross entropy of `hidden @ weight.T` against `targets`, without materialising the logits.

    `compile_kernel()` swaps the per-chunk softmax/gradient for one torch.compile'd kernel (chosen at
    build time by parallel/compile.py, so eager runs stay eager).
    """

    def __init__(self):
        super().__init__()
        self.logits_grad = get_logits_grad

    def compile_kernel(self) -> None:
        self.logits_grad = torch.compile(get_logits_grad, dynamic=False)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden, targets = hidden.flatten(0, -2), targets.flatten()
        # A power of two: matmul-friendly, and equal chunks for power-of-two token counts (one compiled shape).
        chunk_tokens = 2 ** max(0, (CHUNK_ELEMENTS // weight.shape[0]).bit_length() - 1)
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, self.logits_grad)
