"""A/B for the pinned batch copy: runs `trainer.bench` with `Tensor.pin_memory` patched to return the
tensor as it is (a pageable host-to-device copy, the trainer's earlier code). Same arguments as
`python -m trainer.bench`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, not this folder

import torch  # noqa: E402

torch.Tensor.pin_memory = lambda self, *args, **kwargs: self

if __name__ == "__main__":
    from trainer.bench import main

    sys.exit(main(sys.argv[1:]))
