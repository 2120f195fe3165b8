"""CLI edge: `python -m trainer [recipe=NAME] [key=value ...]`, also under torchrun.

`--help` prints the usage with the recipes and config groups there are; `--cfg` prints the composed,
validated config as YAML and runs nothing. User errors (config, data, checkpoint) end here as one line on
stderr and exit code 2; a run stopped on a non-finite step (fault.nonfinite) as one line and exit code 1.
"""
import os
import sys

from trainer.config import CONFIG_DIR, GROUPS, RECIPE_DIR, ConfigError, load_config, to_yaml
from trainer.env import get_env, report_error
from trainer.faults import NonFiniteError



def get_usage() -> str:
    recipes = " ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    groups = "\n".join(f"  {g}=" + "|".join(sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml"))) for g in GROUPS)
    return f"""usage: torchrun --nproc_per_node=N -m trainer [recipe=NAME] [group=choice ...] [key=value ...]
       python -m trainer ...          (one process)
       python -m trainer ... --cfg    (print the composed, validated config as YAML; run nothing)

recipes (recipes/NAME.yaml, or a path to a .yaml file): {recipes}
config groups (configs/GROUP/CHOICE.yaml):
{groups}
keys: any dotted key of the printed config, e.g. train.steps=50 parallel.dp_shard=2 optim.lr=1e-3
related: python -m trainer.bench | trainer.roofline | trainer.sweep | trainer.report | trainer.export |
         trainer.sample | parallel.plan | recipes.chinchilla (README.md has a tour)"""


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(get_usage())
        return 0
    print_only = "--cfg" in argv
    try:
        cfg = load_config([arg for arg in argv if arg != "--cfg"])
        if print_only:
            if get_env().is_main:
                print(to_yaml(cfg), end="")
            return 0
        from trainer.train import train

        train(cfg)
    except (ConfigError, NonFiniteError) as exc:
        return report_error(str(exc), 2 if isinstance(exc, ConfigError) else 1)
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
