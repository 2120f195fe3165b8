"""Chinchilla sizing: a compute budget (or a parameter count) -> compute-optimal parameters and tokens
-> a model shape -> a runnable recipe.

    python -m recipes.chinchilla budget=1e21 [rule=tokens_per_param|approach3] [out=recipes/NAME.yaml]
    python -m recipes.chinchilla gpus=64 hours=24 gpu=h100 [mfu=0.4]
    python -m recipes.chinchilla params=1.3e9 name=chinchilla_1b3 out=recipes/chinchilla_1b3.yaml
    python -m recipes.chinchilla ladder          # rewrite the checked-in recipes/chinchilla_*.yaml
    common keys: seq_len=2048 vocab=32000 name=NAME

Rules (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"), with C = 6 N D:
- Default, `rule=tokens_per_param`: D = 20 N, so N = sqrt(C / 120). This is the paper's Table 3 (Approach 1)
  to within a few per cent (400M -> 8.0B tokens ... 175B -> 3.7T) and what users expect.
- `rule=approach3`: the parametric fit L(N, D) = E + A / N^alpha + B / D^beta (E=1.69, A=406.4, B=410.7,
  alpha=0.34, beta=0.28) minimised under C = 6ND: N = G (C/6)^a, D = (C/6)^b / G, a = beta/(alpha+beta),
  b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta)). With these rounded published constants it
  gives smaller models on more tokens above ~1e17 FLOPs (32B at Gopher's 5.76e23); it is printed beside the default, and the
  same fit predicts the final loss of every plan (nats on the paper's MassiveText tokenizer, so indicative only).
N counts all parameters, embeddings included, as the paper does (`models.count_params`). Once a shape is
chosen, D is recomputed from its real N: C / (6 N) for a budget, 20 N for a parameter count.

Shape rule (`get_shape`), Llama-style (SwiGLU, RMSNorm, RoPE, untied output):
- vocab 32,000 (Llama 1/2 size; 128 x 250, so any power-of-two TP degree up to 128 divides it). Override: vocab=.
- head_dim 64 while dim < 2048, 128 from 2048; dim a multiple of 128 (256 from 2048 on); from N >= 3e9,
  GQA with 8 KV heads and dim a multiple of 1024 (so 8 divides the head count and TP up to 8 splits KV heads).
- ffn_dim = 8/3 dim rounded up to a multiple of 256.
- aspect ratio dim / num_layers within a factor 1.6 of a target that grows from 64 (N <= 1e9, GPT-3 small
  models) to 128 (N >= 1e10, Llama 2 7B/13B), log-linearly in between. Among those shapes, the ones whose
  parameter count is within 1 % of N compete on aspect (nearest the target wins); when none is, the closest
  count wins. Depth is any integer (pipeline stages take uneven layer counts).
Batch and LR (`get_hparams`): GPT-3's Table 2.1 (Brown et al. 2020), interpolated log-log in N and clamped at
its ends: LR 6e-4 at 125M down to 1e-4 at 13B and 6e-5 at 175B; batch 0.5M tokens up to 760M, 1M at 1.3B-2.7B,
2M at 6.7B-13B, 3.2M at 175B, then rounded to a power-of-two number of sequences. Warm-up 1 % of the steps
(at least 100, at most 2000, at most a tenth of the run), cosine decay to 10 % of the peak (optim defaults:
AdamW, betas 0.9/0.95, weight decay 0.1, clip 1.0). micro_batch_size is a starting point for 80-141 GB GPUs:
accumulation is derived from the layout; `python -m trainer.sweep top=K` measures better ones.
Data: the `synthetic` group, so every recipe runs anywhere (throughput, memory, layouts). For a real run add
e.g. `data.synthetic=false data.dataset=HF_NAME data.tokenizer=bpe data.bpe_vocab_size=32000`.

Must not hold training code or config checks: trainer/config.py validates what this emits.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from models import ModelConfig, count_params
from trainer.config import ConfigError, check_writable
from trainer.data import ByteTokenizer

# Hoffmann et al. 2022, Approach 3 (section 3.3, equation 10's fitted values).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TOKENS_PER_PARAM = 20.0
RULES = ("tokens_per_param", "approach3")
DEFAULT_VOCAB = 32000
DEFAULT_SEQ_LEN = 2048
GQA_FROM_PARAMS = 3e9
GQA_KV_HEADS = 8
ASPECT_TOLERANCE = 1.6  # dim / num_layers within [target / 1.6, target x 1.6]
COUNT_TOLERANCE = 0.01  # |log(count / N)|
MAX_LAYERS = 256
SHAPE_TOLERANCE = 0.1  # a shape further than this from N is refused, not written
MIN_VOCAB = ByteTokenizer.vocab_size  # the trainer refuses a model.vocab_size below its tokenizer's
HARDWARE_KEYS = ("gpus", "hours", "gpu", "peak_tflops", "mfu")

# GPT-3 Table 2.1: (parameters, learning rate, batch tokens).
GPT3_HPARAMS = (
    (125e6, 6.0e-4, 0.5e6), (350e6, 3.0e-4, 0.5e6), (760e6, 2.5e-4, 0.5e6), (1.3e9, 2.0e-4, 1e6),
    (2.7e9, 1.6e-4, 1e6), (6.7e9, 1.2e-4, 2e6), (13e9, 1.0e-4, 2e6), (175e9, 0.6e-4, 3.2e6),
)
# (largest N, micro batch of seq_len 2048): what fits an 80-141 GB GPU with FSDP and no activation checkpointing.
MICRO_BATCH = ((0.5e9, 16), (2e9, 8), (5e9, 4), (20e9, 2), (math.inf, 1))

# The checked-in ladder: recipe name -> target parameter count.
LADDER = {
    "chinchilla_125m": 125e6, "chinchilla_350m": 350e6, "chinchilla_760m": 760e6, "chinchilla_1b3": 1.3e9,
    "chinchilla_3b": 3e9, "chinchilla_7b": 7e9, "chinchilla_13b": 13e9, "chinchilla_70b": 70e9,
}
RECIPE_DIR = Path(__file__).resolve().parent


class SizingError(ValueError):
    """A user error on the command line: one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# Scaling laws.


def get_loss(params: float, tokens: float) -> float:
    """Approach 3's predicted final loss L(N, D) in nats."""
    return E + A / params**ALPHA + B / tokens**BETA


def get_approach3_allocation(compute: float) -> tuple[float, float]:
    """(N, D) minimising L(N, D) subject to 6 N D = compute."""
    a, b = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return g * (compute / 6) ** a, (compute / 6) ** b / g


def get_tokens_per_param_allocation(compute: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with D = tokens_per_param x N and 6 N D = compute."""
    params = math.sqrt(compute / (6 * tokens_per_param))
    return params, tokens_per_param * params


def get_allocation(compute: float, rule: str) -> tuple[float, float]:
    if rule == "approach3":
        return get_approach3_allocation(compute)
    return get_tokens_per_param_allocation(compute)


def get_peak_tflops(gpu: str) -> float:
    """Dense bf16 peak of a GPU named like trainer/env.py's table (case-insensitive; 'h100' is the SXM part)."""
    from trainer.env import PEAK_BF16_TFLOPS

    by_name = {name.lower(): tflops for name, tflops in PEAK_BF16_TFLOPS.items()}
    key = gpu.lower().replace("-", " ").replace("_", " ")
    if key in by_name:
        return by_name[key]
    raise SizingError(f"gpu={gpu!r}: unknown; choose one of {sorted(PEAK_BF16_TFLOPS)} or give peak_tflops=")


def get_hardware_compute(gpus: int, hours: float, peak_tflops: float, mfu: float) -> float:
    return gpus * hours * 3600 * peak_tflops * 1e12 * mfu


# ---------------------------------------------------------------------------------------------
# Shape, batch and learning rate.


def get_target_aspect(params: float) -> float:
    """dim / num_layers: 64 up to 1e9 parameters, 128 from 1e10, log-linear in between."""
    return 64 * 2 ** min(max(math.log10(params / 1e9), 0.0), 1.0)


def build_shape(params: float, *, num_layers: int, dim: int, vocab_size: int, seq_len: int) -> ModelConfig:
    head_dim = 128 if dim >= 2048 else 64
    num_heads = dim // head_dim
    num_kv_heads = GQA_KV_HEADS if params >= GQA_FROM_PARAMS else num_heads
    ffn_dim = math.ceil(8 * dim / 3 / 256) * 256
    return ModelConfig(vocab_size=vocab_size, dim=dim, num_layers=num_layers, num_heads=num_heads,
                       num_kv_heads=num_kv_heads, ffn_dim=ffn_dim, pos_encoding="rope", rope_theta=10000.0,
                       max_seq_len=seq_len, tie_embeddings=False)


def get_shape(params: float, *, vocab_size: int = DEFAULT_VOCAB, seq_len: int = DEFAULT_SEQ_LEN) -> ModelConfig:
    """The shape rule of the module docstring: among shapes within 1 % of `params`, the aspect ratio nearest
    the target; when none is that close, the closest count."""
    target = get_target_aspect(params)
    candidates = []  # (count error, aspect error, shape)
    for num_layers in range(1, MAX_LAYERS + 1):
        low, high = target * num_layers / ASPECT_TOLERANCE, target * num_layers * ASPECT_TOLERANCE
        for dim in range(128 * math.ceil(low / 128), int(high) + 1, 128):
            step = 1024 if params >= GQA_FROM_PARAMS else 256 if dim >= 2048 else 128
            if dim % step:
                continue
            shape = build_shape(params, num_layers=num_layers, dim=dim, vocab_size=vocab_size, seq_len=seq_len)
            candidates.append((abs(math.log(count_params(shape) / params)),
                               abs(math.log(dim / num_layers / target)), shape))
    assert candidates, params
    close = [c for c in candidates if c[0] <= COUNT_TOLERANCE]
    if close:
        return min(close, key=lambda c: (c[1], c[0]))[2]
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def _interpolate(params: float, column: int) -> float:
    points = [(math.log(row[0]), math.log(row[column])) for row in GPT3_HPARAMS]
    x = min(max(math.log(params), points[0][0]), points[-1][0])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return math.exp(points[-1][1])


def get_hparams(params: float, seq_len: int) -> tuple[float, int]:
    """(peak learning rate, global batch in sequences) for a model of `params` parameters."""
    lr = float(f"{_interpolate(params, 1):.2g}")
    sequences = 2 ** round(math.log2(_interpolate(params, 2) / seq_len))
    return lr, max(1, sequences)


def get_micro_batch(params: float, seq_len: int, global_batch_size: int) -> int:
    per_2048 = next(size for limit, size in MICRO_BATCH if params <= limit)
    micro = max(1, 2 ** round(math.log2(max(1.0, per_2048 * DEFAULT_SEQ_LEN / seq_len))))
    return min(micro, global_batch_size)


def get_warmup(steps: int) -> int:
    return max(1, min(max(100, round(steps / 100)), 2000, steps // 10))


# ---------------------------------------------------------------------------------------------
# Plans and recipes.


@dataclass
class Plan:
    name: str
    command: str  # the command line that regenerates the recipe
    rule: str
    target_params: float
    model: ModelConfig
    params: int
    tokens: int  # train.steps x global batch x seq_len
    compute: float  # 6 N D with the real N and D
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    steps: int
    lr: float
    warmup_steps: int

    @property
    def predicted_loss(self) -> float:
        return get_loss(self.params, self.tokens)


def make_plan(*, params: float | None = None, compute: float | None = None, rule: str = "tokens_per_param",
              seq_len: int = DEFAULT_SEQ_LEN, vocab_size: int = DEFAULT_VOCAB, name: str = "chinchilla",
              command: str = "") -> Plan:
    """A plan from a parameter count (tokens = 20 N) or a compute budget (N from `rule`, D = C / 6N)."""
    if (params is None) == (compute is None):
        raise SizingError("give exactly one of params=, budget= or gpus=/hours=/gpu=")
    if rule not in RULES:
        raise SizingError(f"rule={rule!r}: must be one of {list(RULES)}")
    target = params if params is not None else get_allocation(compute, rule)[0]
    model = get_shape(target, vocab_size=vocab_size, seq_len=seq_len)
    real = count_params(model)
    tokens = TOKENS_PER_PARAM * real if compute is None else compute / (6 * real)
    lr, global_batch = get_hparams(real, seq_len)
    steps = max(1, math.ceil(tokens / (global_batch * seq_len)))
    return Plan(name=name, command=command, rule=rule if compute is not None else "tokens_per_param",
                target_params=target, model=model, params=real, tokens=steps * global_batch * seq_len,
                compute=6 * real * steps * global_batch * seq_len, seq_len=seq_len, global_batch_size=global_batch,
                micro_batch_size=get_micro_batch(real, seq_len, global_batch), steps=steps, lr=lr,
                warmup_steps=get_warmup(steps))


def _short(number: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= scale:
            return f"{number / scale:.3g}{unit}"
    return f"{number:.3g}"


def render_recipe(plan: Plan) -> str:
    m = plan.model
    rule = "20 tokens/parameter" if plan.rule == "tokens_per_param" else "Approach 3 allocation"
    lines = [
        f"# Chinchilla-sized ({rule}): {plan.params:,} parameters (target {_short(plan.target_params)}),",
        f"# {plan.tokens:,} tokens = {plan.steps} steps x {plan.global_batch_size} x {plan.seq_len}, "
        f"{plan.compute:.3g} FLOPs (6ND).",
        f"# Approach-3 predicted final loss {plan.predicted_loss:.3f} nats (Hoffmann et al. 2022 fit; indicative).",
        "# Synthetic tokens so it runs anywhere; real data: data.synthetic=false data.dataset=NAME data.tokenizer=bpe",
        "# data.bpe_vocab_size=32000. Rules: recipes/chinchilla.py. Generated, do not edit; regenerate with",
        f"# {plan.command or 'python -m recipes.chinchilla ladder'}",
        "defaults:",
        "  - data: synthetic",
        "  - train: gpu",
        "model:",
        f"  vocab_size: {m.vocab_size}",
        f"  dim: {m.dim}",
        f"  num_layers: {m.num_layers}",
        f"  num_heads: {m.num_heads}",
        f"  num_kv_heads: {m.num_kv_heads}",
        f"  ffn_dim: {m.ffn_dim}",
        f"  pos_encoding: {m.pos_encoding}",
        f"  rope_theta: {m.rope_theta:.1f}",
        f"  max_seq_len: {m.max_seq_len}",
        f"  tie_embeddings: {str(m.tie_embeddings).lower()}",
        "train:",
        f"  steps: {plan.steps}",
        f"  seq_len: {plan.seq_len}",
        f"  global_batch_size: {plan.global_batch_size}",
        f"  micro_batch_size: {plan.micro_batch_size}",
        "  precision: bf16",
        "  compile: true",
        "  val_every: 500",
        "optim:",
        f"  lr: {plan.lr:.1e}",
        "  schedule: cosine",
        "  min_lr_ratio: 0.1",
        f"  warmup_steps: {plan.warmup_steps}",
        "  compile: true",
        "log:",
        "  every: 10",
        "checkpoint:",
        "  every: 1000",
    ]
    return "\n".join(lines) + "\n"


def get_ladder_plans(seq_len: int = DEFAULT_SEQ_LEN, vocab_size: int = DEFAULT_VOCAB) -> list[Plan]:
    return [make_plan(params=params, name=name, seq_len=seq_len, vocab_size=vocab_size,
                      command=f"python -m recipes.chinchilla params={_short(params)} name={name} out=recipes/{name}.yaml")
            for name, params in LADDER.items()]


def describe(plan: Plan, compute: float | None) -> str:
    m = plan.model
    lines = []
    if compute is not None:
        lines.append(f"compute {compute:.3g} FLOPs (C = 6ND)")
        lines.append(f"  {'rule':<22}{'params':>9}{'tokens':>9}{'tokens/param':>14}{'pred. loss':>12}")
        for rule, label in (("tokens_per_param", "20 tokens/param"), ("approach3", "Approach 3 fit")):
            n, d = get_allocation(compute, rule)
            chosen = " <- used" if rule == plan.rule else ""
            lines.append(f"  {label:<22}{_short(n):>9}{_short(d):>9}{d / n:>14.1f}{get_loss(n, d):>12.3f}{chosen}")
    error = plan.params / plan.target_params - 1
    lines.append(f"shape: {m.num_layers} layers, dim {m.dim}, {m.num_heads} heads ({m.num_kv_heads} kv), ffn {m.ffn_dim}, "
                 f"vocab {m.vocab_size} -> {plan.params:,} parameters ({100 * error:+.1f} % from {_short(plan.target_params)})")
    if abs(error) > 0.1:
        lines.append("  note: no shape within 10 % of the target (the vocabulary dominates tiny models; try vocab=)")
    lines.append(f"run: {plan.steps} steps x {plan.global_batch_size} sequences x {plan.seq_len} = {_short(plan.tokens)} tokens "
                 f"({plan.tokens / plan.params:.1f}/param), lr {plan.lr:.1e}, warmup {plan.warmup_steps}, "
                 f"predicted loss {plan.predicted_loss:.3f}")
    return "\n".join(lines)


def _number(key: str, value: str) -> float:
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}.get(value[-1:].lower(), 1.0)
    try:
        number = float(value[:-1] if scale != 1.0 else value) * scale
    except ValueError:
        raise SizingError(f"{key}={value!r}: not a number") from None
    if not number > 0:
        raise SizingError(f"{key}={value!r}: must be > 0")
    if math.isinf(number):  # 'inf', or past float range ('1e400')
        raise SizingError(f"{key}={value!r}: must be finite")
    return number


def _integer(key: str, value: str) -> int:
    number = _number(key, value)
    if not number.is_integer():
        raise SizingError(f"{key}={value!r}: must be a whole number")
    return int(number)


def check_shape(plan: Plan, source: str) -> None:
    """Refuse a recipe far off its target: the shape search's range ends at tiny and huge N."""
    error = plan.params / plan.target_params - 1
    if abs(error) > SHAPE_TOLERANCE:
        why = ("beyond the largest shape the search builds, 256 layers" if plan.model.num_layers == MAX_LAYERS
               else "the vocabulary's embeddings dominate a model this small; try a smaller vocab=")
        raise SizingError(f"{source}: no recipe written: the closest shape has {plan.params:,} parameters, "
                          f"{100 * error:+.0f} % from the target {_short(plan.target_params)} ({why})")


KEYS = ("budget", "params", "gpus", "hours", "gpu", "mfu", "peak_tflops", "rule", "seq_len", "vocab", "name", "out")


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print("\n\n".join(__doc__.split("\n\n")[:2]).strip())
        return 0
    try:
        if argv == ["ladder"]:
            for plan in get_ladder_plans():
                path = RECIPE_DIR / f"{plan.name}.yaml"
                path.write_text(render_recipe(plan))
                print(f"wrote {path.relative_to(RECIPE_DIR.parent)}: {describe(plan, None).splitlines()[0]}")
            return 0
        args = {}
        for item in argv:
            key, sep, value = item.partition("=")
            if not sep or key not in KEYS:
                raise SizingError(f"{item!r}: expected key=value with key in {list(KEYS)}, or 'ladder'")
            args[key] = value
        if ("params" in args) + ("budget" in args) + any(k in args for k in HARDWARE_KEYS) != 1:
            given = " ".join(f"{k}={args[k]}" for k in ("params", "budget", *HARDWARE_KEYS) if k in args)
            raise SizingError(f"{given or 'no budget'}: give exactly one of params=, budget= or gpus=/hours=/gpu=")
        # Every argument is checked before the shape search and the write.
        compute, hardware = None, None
        if "budget" in args:
            compute = _number("budget", args["budget"])
            source = f"budget={args['budget']}"
        elif "params" not in args:
            missing = [k for k in ("gpus", "hours") if k not in args]
            if missing or not ("gpu" in args or "peak_tflops" in args):
                raise SizingError("a hardware budget needs gpus=, hours= and gpu= (or peak_tflops=)")
            gpus = _integer("gpus", args["gpus"])
            hours = _number("hours", args["hours"])
            peak = _number("peak_tflops", args["peak_tflops"]) if "peak_tflops" in args else get_peak_tflops(args["gpu"])
            mfu = _number("mfu", args.get("mfu", "0.4"))
            if mfu > 1:
                raise SizingError(f"mfu={mfu}: a fraction of the peak, in (0, 1]")
            compute = get_hardware_compute(gpus, hours, peak, mfu)
            hardware = f"hardware: {gpus} x {args.get('gpu', 'GPU')} ({peak:g} TFLOP/s bf16) x {hours:g} h x MFU {mfu:g}"
            source = f"gpus={args['gpus']} hours={args['hours']}"
            if math.isinf(compute):
                raise SizingError(f"{source}: the budget overflows a float")
        params = None
        if "params" in args:
            params, source = _number("params", args["params"]), f"params={args['params']}"
        seq_len = _integer("seq_len", args.get("seq_len", str(DEFAULT_SEQ_LEN)))
        vocab_size = _integer("vocab", args.get("vocab", str(DEFAULT_VOCAB)))
        if vocab_size < MIN_VOCAB:
            raise SizingError(f"vocab={args['vocab']}: below the byte tokenizer's {MIN_VOCAB} tokens (the trainer "
                              "refuses it)")
        out = check_writable("out", args["out"], folder=False) if "out" in args else None
        name = args.get("name") or (out.stem if out else "chinchilla")
        plan = make_plan(params=params, compute=compute, rule=args.get("rule", "tokens_per_param"), seq_len=seq_len,
                         vocab_size=vocab_size, name=name, command="python -m recipes.chinchilla " + " ".join(argv))
        check_shape(plan, source)
        text = render_recipe(plan)
        if out is not None:  # written before anything is printed, so a failed write is the only line
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(text)
            except OSError as exc:
                raise SizingError(f"out={args['out']!r}: cannot write ({exc.strerror or exc})") from None
    except (SizingError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if hardware:
        print(hardware)
    print(describe(plan, compute))
    if out is None:
        print("\n" + text, end="")
        return 0
    print(f"wrote {out} (run: python -m trainer recipe={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
