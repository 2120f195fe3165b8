"""CLI edge: `python -m trainer [recipe=NAME] [key=value ...]`, also under torchrun.

User errors (config, data, checkpoint) end here as one line on stderr and exit code 2.
"""
import sys

from trainer.config import ConfigError, load_config
from trainer.env import get_env


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
        from trainer.train import train

        train(cfg)
    except ConfigError as exc:
        if get_env().is_main:  # every rank finds the same error; one line is enough
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
