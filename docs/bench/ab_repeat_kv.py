"""A/B for SDPA's enable_gqa: runs `trainer.bench` with attention patched back to repeating kv heads
(repeat_interleave, the model's earlier code). Same arguments as `python -m trainer.bench`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sdpa = F.scaled_dot_product_attention


def sdpa_repeating_kv(q, k, v, *args, enable_gqa=False, **kwargs):
    if enable_gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return sdpa(q, k, v, *args, **kwargs)


F.scaled_dot_product_attention = sdpa_repeating_kv
torch.nn.functional.scaled_dot_product_attention = sdpa_repeating_kv

if __name__ == "__main__":
    from trainer.bench import main

    sys.exit(main(sys.argv[1:]))
