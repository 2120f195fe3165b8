"""A/B for levers that have no config key: runs `trainer.bench` with some of them turned back to the earlier code.
Same arguments as `python -m trainer.bench`. Environment:
  AB_OFF: comma-separated, any of
    bf16_residual  the residual stream stays fp32 under autocast (the embedding's output is not cast);
  LOSS_CHUNK_ELEMENTS: logits elements per chunk of the fused loss (with train.fused_loss=true), e.g. 2**33 for one
    chunk per batch-24 step.
  COMPILE_MODE: torch.compile's mode for the compiled blocks, e.g. reduce-overhead (CUDA graphs); each train step
    then starts a new CUDA-graph generation.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import torch  # noqa: E402

import models.llama  # noqa: E402
import models.loss  # noqa: E402
import trainer.train  # noqa: E402

off = set(filter(None, os.environ.get("AB_OFF", "").split(",")))
unknown = off - {"bf16_residual"}
if unknown:
    sys.exit(f"AB_OFF: unknown lever(s) {sorted(unknown)}")
if "bf16_residual" in off:
    models.llama.to_compute_dtype = lambda h: h
if os.environ.get("LOSS_CHUNK_ELEMENTS"):
    base, _, exponent = os.environ["LOSS_CHUNK_ELEMENTS"].partition("**")
    models.loss.CHUNK_ELEMENTS = int(base) ** int(exponent or 1)
if os.environ.get("COMPILE_MODE"):
    compile_module, train_step = torch.nn.Module.compile, trainer.train.train_step

    def compile_with_mode(module, *args, **kwargs):
        compile_module(module, *args, mode=os.environ["COMPILE_MODE"], **kwargs)

    def train_step_in_a_new_generation(*args, **kwargs):
        # The step's graphs may overwrite the outputs of the last step's: tell the CUDA-graph trees a step begins.
        torch.compiler.cudagraph_mark_step_begin()
        return train_step(*args, **kwargs)

    torch.nn.Module.compile = compile_with_mode
    trainer.train.train_step = train_step_in_a_new_generation

if __name__ == "__main__":
    from trainer.bench import main

    sys.exit(main(sys.argv[1:]))
