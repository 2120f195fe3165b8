"""The typed config tree and every check on it.

Holds the dataclasses OmegaConf reads (one section per concern), the driver that composes
configs/ groups, a recipe and CLI overrides, and `validate`, the one place for cross-field
checks. Must not hold anything that starts a process group or builds a model.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from models import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
RECIPE_DIR = ROOT / "recipes"
GROUPS = ("model", "data", "optim", "train", "parallel", "checkpoint", "log")

POS_ENCODINGS = ("rope", "alibi", "sinusoidal", "learned")
TOKENIZERS = ("byte", "bpe")
LR_SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16", "fp8")
AC_MODES = ("none", "full", "selective")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("disabled", "offline", "online")
NONFINITE_POLICIES = ("skip", "stop")
FAULT_INJECTIONS = ("", "nan", "kill", "kill_in_save", "hang", "sigterm")


class ConfigError(ValueError):
    """A user error in the config: one line naming the key path, the value and what is allowed."""


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """'TypeName: message' on one line, for the innermost cause (libraries wrap the reason in a generic error)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


def print_help(argv: list[str], doc: str, end: str = "Must not") -> bool:
    """For a CLI's -h/--help: print its module docstring up to `end` and return True."""
    if "-h" not in argv and "--help" not in argv:
        return False
    print(doc.split(end)[0].strip())
    return True


def parse_int(key: str, value: str, *, minimum: int | None = None) -> int:
    """A CLI tool's `key=value` integer, or one line saying what is wrong with it."""
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: must be an integer") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{key}={number}: must be >= {minimum}")
    return number


def check_writable(key: str, value: str, *, folder: bool) -> Path:
    """`key=value` names a folder (or, folder=False, a file) that can be created or written into, checked before
    any work; nothing is created here."""
    if not value:
        raise ConfigError(f"{key}='': must name a {'folder' if folder else 'file'}")
    path = Path(value)
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value!r}: exists and is not a folder")
    if not folder and path.is_dir():
        raise ConfigError(f"{key}={value!r}: is a folder")
    existing = path.absolute() if folder else path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value!r}: not writable ({existing} is not a writable folder)")
    return path


@dataclass
class RunConfig:
    dir: str = "runs/default"
    device: str = "auto"


@dataclass
class DataConfig:
    # "kjv" is the embedded corpus; otherwise a local file/folder (text, json, jsonl, parquet) or a hub name.
    dataset: str = "kjv"
    text_field: str = "text"
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.02
    cache_dir: str = ".cache/ridgeline"
    streaming: bool = False
    # Synthetic random tokens: for speed benchmarks only.
    synthetic: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    grad_clip: float = 1.0  # 0 disables clipping
    fused: bool = True
    # Clipping inside a torch.compile'd AdamW step (trainer/optim.py:ClippedAdamW): no pass of its own.
    compile: bool = False


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 1234
    seq_len: int = 256
    global_batch_size: int = 16
    micro_batch_size: int = 0  # rows per forward on a rank; 0: the rank's whole share (no accumulation)
    precision: str = "fp32"  # fp32 | bf16 | fp8 (bf16 compute + torchao float8 block linears)
    fp8_recipe: str = "tensorwise"  # tensorwise | rowwise
    fp8_all_gather: bool = True  # FSDP all-gathers float8 weights (tensorwise recipe only)
    # Fast accumulation in the backward float8 matmuls too: +4 % on the H200, but the loss drifted (docs/performance.md).
    fp8_fast_accum: bool = False
    fp8_output: bool = False  # the output layer in float8 too (torchtitan keeps it bf16); not with fused_loss
    val_every: int = 50
    val_batches: int = 4  # global batches of validation samples, fixed, shared out over data-parallel ranks
    activation_checkpointing: str = "none"
    ac_every: int = 1  # checkpoint every k-th block
    compile: bool = False
    attention_backend: str = "auto"
    # A memory lever, off by default: on the H200 it cost 1.6 % of bf16 throughput (docs/performance.md).
    fused_loss: bool = False  # cross entropy fused with the output layer, in chunks (no logits); not under tp/pp


@dataclass
class ParallelConfig:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    zero: int = 3  # over dp_shard: 1 optimizer state, 2 + gradients, 3 + parameters; 0 = plain DDP
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    microbatches: int = 0  # 0: one per pipeline stage (pp x virtual_stages)
    virtual_stages: int = 1
    backend: str = "auto"


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep: int = 2
    load: str = ""
    enabled: bool = True
    async_save: bool = False


@dataclass
class LogConfig:
    every: int = 10
    wandb: str = "disabled"
    wandb_project: str = "ridgeline"
    progress: str = "auto"  # auto | bar | lines
    peak_tflops: float = 0.0  # 0: look the device up in the table
    layer_stats: int = 0  # every N steps: per-block gradient/parameter/update/activation statistics; 0 = off


@dataclass
class ProfileConfig:
    # Profiling starts after `start_step` steps (warm-up, compile) and covers `steps` steps.
    start_step: int = 10
    steps: int = 3
    trace: bool = False  # torch.profiler chrome trace in <run.dir>/profile/
    memory_snapshot: bool = False  # CUDA memory snapshot pickle in <run.dir>/profile/ (view at pytorch.org/memory_viz)
    roofline: bool = False  # roofline report in <run.dir>/roofline/
    roofs_cache: str = ""  # JSON of measured roofs per device; "" = <data.cache_dir>/roofs.json


@dataclass
class FaultConfig:
    nonfinite: str = "skip"  # skip | stop: what a non-finite loss or gradient norm does
    max_skips: int = 3  # skipped steps in a row before the run stops anyway
    watchdog_s: float = 600.0  # a step (collectives included) longer than this ends the run; 0 = off
    # Test hooks, off by default: make a fault happen so that tests can watch it being handled (trainer/faults.py).
    inject: str = ""  # "" | nan | kill | kill_in_save | hang | sigterm
    inject_step: int = 0  # the step (from 1) it happens at
    inject_rank: int = -1  # the rank it happens on; -1: every rank
    inject_module: str = ""  # nan: the module whose forward output turns NaN, e.g. layers.1.feed_forward.w2
    inject_repeat: int = 1  # nan: for this many steps in a row


@dataclass
class Config:
    recipe: str = "default"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "recipe")
# Float keys where 0 switches a feature off: a non-finite value gets this hint.
ZERO_MEANS = {"optim.grad_clip": "0 turns clipping off", "fault.watchdog_s": "0 turns the watchdog off",
              "log.peak_tflops": "0 looks the device up"}


# ---------------------------------------------------------------------------------------------
# Composition: configs/ groups -> recipe -> CLI overrides, then the typed schema.


def _recipe_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = RECIPE_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    choices = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe={name!r}: no such recipe; choose one of {choices} or give a .yaml path")


def _group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _dotted_key(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    return str(key)


def _check_sections(values: dict) -> None:
    """A section given a scalar or list (`run: 5`, `run=5`): OmegaConf's merge error names no key."""
    for key, value in values.items():
        if key in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: must be a mapping of {key}.* keys (e.g. {key}.<key>=<value>)")


def _raw(node: DictConfig, key: str) -> Any:
    """The unresolved value at a dotted key, or None."""
    value: Any = OmegaConf.to_container(node, resolve=False)
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def load_config(overrides: list[str] | tuple[str, ...] = (), *, world_size: int | None = None) -> Config:
    """Compose the config for `overrides` (hydra-style `key=value` strings) and validate it alone
    (for `world_size` processes; default WORLD_SIZE, as torchrun sets it).

    Order, later wins: configs/<group>/<choice>.yaml for each group, then the recipe's values,
    then the command line. Group choices come from the recipe's `defaults` and from CLI
    `group=choice` overrides.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    recipe_name = "default"
    value_overrides, cli_groups = [], {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r}: overrides take the form key=value (e.g. train.steps=50)")
        key, value = item.split("=", 1)
        if key == "recipe":
            recipe_name = value
        elif key in GROUPS and not value.startswith("{"):
            cli_groups[key] = value
        else:
            value_overrides.append(item)

    recipe_file = _recipe_path(recipe_name)
    try:
        recipe = OmegaConf.load(recipe_file)
    except Exception as exc:  # yaml errors carry line numbers; keep them on one line
        raise ConfigError(f"recipe={recipe_name!r}: cannot read {recipe_file}: {' '.join(str(exc).split())}")
    if not isinstance(recipe, DictConfig):
        raise ConfigError(f"recipe={recipe_name!r}: {recipe_file} must hold a mapping")
    groups = {}
    defaults = recipe.pop("defaults", None)
    if defaults is not None and not isinstance(defaults, ListConfig):
        shown = OmegaConf.to_container(defaults, resolve=False) if isinstance(defaults, DictConfig) else defaults
        raise ConfigError(f"recipe={recipe_name!r}: defaults={shown!r}: must be a list of '- group: choice' entries")
    for entry in defaults or []:
        if not isinstance(entry, DictConfig) or len(entry) != 1:
            raise ConfigError(f"recipe={recipe_name!r}: defaults entries take the form '- group: choice'")
        ((group, choice),) = entry.items()
        groups[str(group)] = str(choice)
    groups.update(cli_groups)
    for group, choice in groups.items():
        if group not in GROUPS:
            raise ConfigError(f"{group}={choice!r}: unknown config group; groups are {list(GROUPS)}")
        if choice not in _group_choices(group):
            raise ConfigError(f"{group}={choice!r}: no configs/{group}/{choice}.yaml; choose one of {_group_choices(group)}")

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            composed = compose(config_name="config", overrides=[f"{g}={c}" for g, c in groups.items()])
        except Exception as exc:
            raise ConfigError(f"composing configs/: {' '.join(str(exc).split())}")
    GlobalHydra.instance().clear()

    schema = OmegaConf.structured(Config)
    _check_sections(OmegaConf.to_container(recipe, resolve=False))
    try:
        merged = OmegaConf.merge(schema, composed, recipe)
        if recipe_file.parent.resolve() == RECIPE_DIR:
            merged.recipe = recipe_file.stem
        else:
            merged.recipe = str(recipe_file)
        for item in value_overrides:
            key, value = item.split("=", 1)
            if OmegaConf.select(merged, key, default=MISSING, throw_on_missing=False, throw_on_resolution_failure=False) is MISSING and "." in key:
                parent = key.rsplit(".", 1)[0]
                if OmegaConf.select(merged, parent, default=None) is None:
                    raise ConfigError(f"{key}: unknown key; sections are {['recipe', 'run', *GROUPS, 'profile', 'fault']}")
            parsed = OmegaConf.from_dotlist([item])
            _check_sections(OmegaConf.to_container(parsed, resolve=False))
            if isinstance(OmegaConf.select(schema, key, default=None), str) and isinstance(_raw(parsed, key), dict):
                # YAML reads `hf:` or `a: b` as a mapping; a string key means the text as written.
                OmegaConf.update(merged, key, value, merge=False)
            else:
                merged.merge_with(parsed)
        if not any(o.startswith("run.dir=") for o in value_overrides) and "dir" not in recipe.get("run", {}):
            merged.run.dir = f"runs/{Path(merged.recipe).stem}"
        # Resolving interpolations (`${nope}`, `${oc.env:UNSET}`) fails here, so it sits inside the try.
        cfg: Config = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except InterpolationResolutionError as exc:
        key = _dotted_key(exc)
        msg = str(getattr(exc, "msg", exc)).splitlines()[0]
        raise ConfigError(f"{key}={_raw(merged, key)!r}: cannot resolve: {msg}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe_omegaconf_error(exc)) from None
    validate(cfg, world_size)
    return cfg


def _describe_omegaconf_error(exc: OmegaConfBaseException) -> str:
    key = _dotted_key(exc)
    msg = str(exc).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.structured(Config)
        if parent:
            node = OmegaConf.select(node, parent, default=None)
        allowed = sorted(node.keys()) if isinstance(node, DictConfig) else []
        return f"{key}: unknown key; allowed keys here are {allowed}"
    value = str(getattr(exc, "msg", msg)).splitlines()[0]
    return f"{key}: {value}"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ---------------------------------------------------------------------------------------------
# Validation: every cross-field check, before any process group or model exists.


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {list(allowed)}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value}: must be {'>= 0' if zero_ok else '> 0'}")


def _divides(key_a: str, a: int, key_b: str, b: int) -> None:
    if b % a:
        raise ConfigError(f"{key_b}={b} must be divisible by {key_a}={a}")


def resolve_degrees(p: ParallelConfig, world_size: int) -> dict[str, int]:
    """The four mesh degrees with a single -1 inferred; their product must equal the world size."""
    names = ("pp", "dp_replicate", "dp_shard", "tp")
    degrees = {n: getattr(p, n) for n in names}
    inferred = [n for n, d in degrees.items() if d == -1]
    for n, d in degrees.items():
        if d == 0 or d < -1:
            raise ConfigError(f"parallel.{n}={d}: must be a positive degree (or -1 to infer it)")
    if len(inferred) > 1:
        raise ConfigError(f"parallel.{{{','.join(inferred)}}}=-1: at most one degree may be -1")
    known = 1
    for n, d in degrees.items():
        if d != -1:
            known *= d
    if inferred:
        if world_size % known:
            raise ConfigError(
                f"parallel.{inferred[0]}=-1: world size {world_size} is not divisible by the other degrees' product {known}"
            )
        degrees[inferred[0]] = world_size // known
    product = 1
    for d in degrees.values():
        product *= d
    if product != world_size:
        desc = " x ".join(f"{n}={d}" for n, d in degrees.items())
        raise ConfigError(f"parallel: {desc} = {product} processes, but WORLD_SIZE={world_size}")
    return degrees


def validate(cfg: Config, world_size: int | None = None) -> dict[str, int]:
    """Check every value and combination; return the resolved mesh degrees. Never rewrites a value."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    m, d, o, t, p, c, log = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.parallel, cfg.checkpoint, cfg.log

    # NaN passes every `<`/`==` range check below; no float key has a use for inf.
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                key = f"{section}.{f.name}"
                hint = f" ({ZERO_MEANS[key]})" if key in ZERO_MEANS else ""
                raise ConfigError(f"{key}={value}: must be a finite number{hint}")

    _choice("run.device", cfg.run.device, DEVICES)
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda': no CUDA device here (torch.cuda.is_available() is False)")
    if not cfg.run.dir:
        raise ConfigError("run.dir='': must name a folder")
    for key in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.init_std", m.init_std)
    _choice("model.pos_encoding", m.pos_encoding, POS_ENCODINGS)
    _divides("model.num_heads", m.num_heads, "model.dim", m.dim)
    _divides("model.num_kv_heads", m.num_kv_heads, "model.num_heads", m.num_heads)
    if m.pos_encoding == "rope" and (m.dim // m.num_heads) % 2:
        raise ConfigError(f"model.dim/model.num_heads={m.dim // m.num_heads}: rope needs an even head dimension")

    if not d.synthetic and not d.dataset.strip():  # Path("") would read the current folder
        raise ConfigError(f"data.dataset={d.dataset!r}: must name kjv, a local file or folder, or a hub name")
    if not d.synthetic and not d.text_field.strip():
        raise ConfigError(f"data.text_field={d.text_field!r}: must name the dataset's text column")
    if not d.cache_dir.strip():  # Path("") would fill the current folder with cache files
        raise ConfigError(f"data.cache_dir={d.cache_dir!r}: must name a folder")
    _choice("data.tokenizer", d.tokenizer, TOKENIZERS)
    if not 0 < d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={d.val_fraction}: must be in (0, 0.5)")
    if d.tokenizer == "bpe" and d.bpe_vocab_size < 260:
        raise ConfigError(f"data.bpe_vocab_size={d.bpe_vocab_size}: must be >= 260 (256 bytes + specials)")
    tokenizer_vocab = 257 if d.tokenizer == "byte" else d.bpe_vocab_size
    if m.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size}: smaller than the {d.tokenizer} tokenizer's {tokenizer_vocab} tokens"
        )

    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    _positive("optim.grad_clip", o.grad_clip, zero_ok=True)
    _positive("optim.eps", o.eps)
    _positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optim.{key}={getattr(o, key)}: must be in [0, 1)")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction={o.decay_fraction}: must be in (0, 1]")
    _choice("optim.schedule", o.schedule, LR_SCHEDULES)

    for key in ("steps", "seq_len", "global_batch_size", "val_every", "ac_every"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.micro_batch_size", t.micro_batch_size, zero_ok=True)
    _positive("train.val_batches", t.val_batches, zero_ok=True)
    if not 0 <= t.seed <= 2**64 - 1:  # torch.manual_seed's range
        raise ConfigError(f"train.seed={t.seed}: must be in [0, 2**64 - 1]")
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.fp8_recipe", t.fp8_recipe, ("tensorwise", "rowwise"))
    for key in ("fp8_output", "fp8_fast_accum"):
        if getattr(t, key) and t.precision != "fp8":
            raise ConfigError(f"train.{key}=true needs train.precision='fp8', not {t.precision!r}")
    if t.fp8_output and t.fused_loss:
        raise ConfigError("train.fp8_output=true with train.fused_loss=true: the fused loss reads the output weight "
                          "itself, in bf16; turn one off")
    _choice("train.activation_checkpointing", t.activation_checkpointing, AC_MODES)
    _choice("train.attention_backend", t.attention_backend, ("auto", "cudnn", "flash", "efficient", "math"))
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len}: beyond model.max_seq_len={m.max_seq_len}")

    _choice("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    _choice("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
    _choice("parallel.zero", p.zero, (0, 1, 2, 3))
    _positive("parallel.virtual_stages", p.virtual_stages)
    _positive("parallel.microbatches", p.microbatches, zero_ok=True)
    degrees = resolve_degrees(p, world_size)
    tp, pp, dp = degrees["tp"], degrees["pp"], degrees["dp_replicate"] * degrees["dp_shard"]
    if tp > 1:
        _divides("parallel.tp", tp, "model.num_heads", m.num_heads)
        _divides("parallel.tp", tp, "model.num_kv_heads", m.num_kv_heads)
        _divides("parallel.tp", tp, "model.ffn_dim", m.ffn_dim)
        _divides("parallel.tp", tp, "model.vocab_size", m.vocab_size)
        if p.sequence_parallel:
            _divides("parallel.tp", tp, "train.seq_len", t.seq_len)
        if m.pos_encoding == "alibi":
            raise ConfigError("model.pos_encoding='alibi' with parallel.tp>1: ALiBi slopes depend on the global head index")
    elif p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.zero == 0 and degrees["dp_shard"] > 1:
        raise ConfigError(f"parallel.zero=0 (plain DDP) replicates over parallel.dp_replicate; got parallel.dp_shard={degrees['dp_shard']}: use dp_replicate or zero in [1, 2, 3]")
    if p.zero == 1 and degrees["dp_replicate"] > 1:
        raise ConfigError(f"parallel.zero=1 shards optimizer state over parallel.dp_shard; got parallel.dp_replicate={degrees['dp_replicate']}: use dp_shard")
    if p.zero in (0, 1) and tp > 1 and dp > 1:
        raise ConfigError(f"parallel.zero={p.zero} with parallel.tp={tp}: DDP does not take tensor-parallel parameters; use parallel.zero=2 or 3 (FSDP/HSDP)")
    if tp > 1 and p.sequence_parallel and m.pos_encoding in ("learned", "sinusoidal"):
        raise ConfigError(f"model.pos_encoding={m.pos_encoding!r} with parallel.sequence_parallel=true: absolute positions are added to full sequences; use rope or alibi, or turn sequence_parallel off")
    if t.precision == "fp8" and tp > 1:
        raise ConfigError(f"train.precision='fp8' with parallel.tp={tp}: float8 tensor-parallel styles are not wired; use bf16 or tp=1")
    if m.tie_embeddings and world_size > 1:
        raise ConfigError(f"model.tie_embeddings=true needs one process (WORLD_SIZE={world_size}): a tied table does not survive sharding or a stage split")
    interleaved = p.pp_schedule in ("interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv")
    if pp > 1:
        if p.virtual_stages > 1 and not interleaved:
            raise ConfigError(f"parallel.virtual_stages={p.virtual_stages}: needs an interleaved parallel.pp_schedule, not {p.pp_schedule!r}")
        if interleaved and p.virtual_stages < 2:
            raise ConfigError(f"parallel.pp_schedule={p.pp_schedule!r}: needs parallel.virtual_stages >= 2")
        if p.pp_schedule == "zbv" and p.virtual_stages != 2:
            raise ConfigError(f"parallel.pp_schedule='zbv': needs parallel.virtual_stages=2, not {p.virtual_stages}")
        stages = pp * p.virtual_stages
        if m.num_layers < stages:
            raise ConfigError(f"model.num_layers={m.num_layers}: fewer than parallel.pp x virtual_stages = {stages} stages")
    elif p.virtual_stages > 1:
        raise ConfigError(f"parallel.virtual_stages={p.virtual_stages}: needs parallel.pp > 1")
    microbatches = get_microbatches(p, pp)
    pp_microbatches = microbatches if pp > 1 else 1
    micro_batch_size = t.micro_batch_size or 1  # auto: the divisibility by dp (x microbatches) is what counts
    per_rank = dp * micro_batch_size * pp_microbatches
    if t.global_batch_size % per_rank:
        what = "dp" + (" x micro_batch_size" if t.micro_batch_size else "") + (" x microbatches" if pp > 1 else "")
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size}: not divisible by {what} = {per_rank}"
            f" (dp={dp}, train.micro_batch_size={t.micro_batch_size}" + (f", microbatches={microbatches})" if pp > 1 else ")")
        )
    if pp > 1 and interleaved and microbatches % pp:
        raise ConfigError(f"parallel.microbatches={microbatches}: interleaved schedules need a multiple of parallel.pp={pp}")

    _positive("checkpoint.every", c.every, zero_ok=True)
    _positive("checkpoint.keep", c.keep)
    if c.load.startswith("hf:") and not c.load.removeprefix("hf:").strip():  # Path("") would be the current folder
        raise ConfigError(f"checkpoint.load={c.load!r}: needs a folder after hf: (hf:DIR imports a Hugging Face folder)")
    if c.load and not Path(c.load.removeprefix("hf:")).exists():  # hf:DIR imports a Hugging Face folder
        raise ConfigError(f"checkpoint.load={c.load!r}: no such checkpoint")
    _positive("log.every", log.every)
    _positive("log.peak_tflops", log.peak_tflops, zero_ok=True)
    _choice("log.wandb", log.wandb, WANDB_MODES)
    _choice("log.progress", log.progress, ("auto", "bar", "lines"))
    _positive("log.layer_stats", log.layer_stats, zero_ok=True)
    _positive("profile.start_step", cfg.profile.start_step, zero_ok=True)
    _positive("profile.steps", cfg.profile.steps)
    window_end = cfg.profile.start_step + cfg.profile.steps
    if (cfg.profile.trace or cfg.profile.memory_snapshot or cfg.profile.roofline) and window_end > t.steps:
        raise ConfigError(f"profile.start_step + profile.steps = {window_end}: beyond train.steps={t.steps}, the profiling window would not finish")
    _choice("fault.nonfinite", cfg.fault.nonfinite, NONFINITE_POLICIES)
    _positive("fault.max_skips", cfg.fault.max_skips, zero_ok=True)
    _positive("fault.watchdog_s", cfg.fault.watchdog_s, zero_ok=True)
    if cfg.fault.watchdog_s > 1e9:  # twice it becomes the collectives' timedelta, which overflows near 4e13 s
        raise ConfigError(f"fault.watchdog_s={cfg.fault.watchdog_s}: must be at most 1e9 s (0 turns the watchdog off)")
    _choice("fault.inject", cfg.fault.inject, FAULT_INJECTIONS)
    if cfg.fault.inject:
        _positive("fault.inject_step", cfg.fault.inject_step)
        _positive("fault.inject_repeat", cfg.fault.inject_repeat)
        if not -1 <= cfg.fault.inject_rank < world_size:
            raise ConfigError(f"fault.inject_rank={cfg.fault.inject_rank}: must be -1 (every rank) or below WORLD_SIZE={world_size}")
        if cfg.fault.inject == "nan" and not cfg.fault.inject_module:
            raise ConfigError("fault.inject='nan': needs fault.inject_module (e.g. layers.0.feed_forward.w2)")
        if cfg.fault.inject == "nan" and cfg.fault.inject_rank >= 0 and pp > 1:
            _check_injection_stage(cfg.fault, p, m.num_layers, pp, world_size)
    return degrees


def _check_injection_stage(f: FaultConfig, p: ParallelConfig, num_layers: int, pp: int, world_size: int) -> None:
    """Under a pipeline, fault.inject_rank must hold fault.inject_module, or the injection would do nothing."""
    from parallel.pipeline import get_stage_ids, get_stage_layers  # lazy: parallel imports this module

    num_stages = pp * p.virtual_stages
    stages = get_stage_ids(f.inject_rank // (world_size // pp), pp, p.virtual_stages, p.pp_schedule)
    layers = [name for stage in stages for name in get_stage_layers(num_layers, num_stages)[stage]]
    parts = f.inject_module.split(".")
    held = (parts[1] in layers if parts[0] == "layers" else
            0 in stages if parts[0] == "tok_embeddings" else num_stages - 1 in stages)
    if not held:
        raise ConfigError(f"fault.inject_module={f.inject_module!r}: not on fault.inject_rank={f.inject_rank}, whose "
                          f"pipeline stage(s) hold layers {layers}")


def get_microbatches(p: ParallelConfig, pp: int) -> int:
    return p.microbatches or pp * p.virtual_stages


def get_micro_batch_size(t: TrainConfig, dp: int, pp_microbatches: int) -> int:
    """train.micro_batch_size, or with 0 (auto) the rank's whole share of the global batch per pipeline microbatch."""
    return t.micro_batch_size or t.global_batch_size // (dp * pp_microbatches)
