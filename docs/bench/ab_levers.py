"""A/B for levers that have no config key: runs `trainer.bench` with some of them turned back to the earlier code.
Same arguments as `python -m trainer.bench`. Environment:
  AB_OFF: comma-separated, any of
    bf16_residual  the residual stream stays fp32 under autocast (the embedding's output is not cast);
  LOSS_CHUNK_ELEMENTS: logits elements per chunk of the fused loss (with train.fused_loss=true), e.g. 2**33 for one
    chunk per batch-24 step.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import models.llama  # noqa: E402
import models.loss  # noqa: E402

off = set(filter(None, os.environ.get("AB_OFF", "").split(",")))
unknown = off - {"bf16_residual"}
if unknown:
    sys.exit(f"AB_OFF: unknown lever(s) {sorted(unknown)}")
if "bf16_residual" in off:
    models.llama.to_compute_dtype = lambda h: h
if os.environ.get("LOSS_CHUNK_ELEMENTS"):
    base, _, exponent = os.environ["LOSS_CHUNK_ELEMENTS"].partition("**")
    models.loss.CHUNK_ELEMENTS = int(base) ** int(exponent or 1)

if __name__ == "__main__":
    from trainer.bench import main

    sys.exit(main(sys.argv[1:]))
