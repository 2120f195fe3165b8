"""CLI edge: `python -m trainer [recipe=NAME] [key=value ...]`, also under torchrun.

User errors (config, data, checkpoint) end here as one line on stderr and exit code 2; a run stopped on a
non-finite step (fault.nonfinite) as one line and exit code 1.
"""
import os
import sys
import time

from trainer.config import ConfigError, load_config
from trainer.env import get_env
from trainer.faults import NonFiniteError


LINE_GRACE_S = 5.0


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
        from trainer.train import train

        train(cfg)
    except (ConfigError, NonFiniteError) as exc:
        if get_env().is_main:  # every rank finds the same error (or stops at the same step); one line is enough
            print(f"error: {exc}", file=sys.stderr)
        else:
            # torchrun stops all workers when the first one exits: give rank 0 the time to print the line.
            time.sleep(LINE_GRACE_S)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if get_env().world_size > 1:
        # DTensor's caches keep gloo groups alive past destroy_process_group, and a gloo worker thread
        # can abort the interpreter's shutdown after all work is written: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
