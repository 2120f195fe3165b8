"""Layout planner: every valid layout of a recipe for N GPUs, priced and ranked, in seconds.

    python -m parallel.plan recipe=NAME world_size=N gpu=h100 [gpus_per_node=8] [top=20] [json=PATH]
        [calib=PATH] [key=value config overrides ...]

Enumerates pp x dp_replicate x dp_shard x tp (tp inside a node), ZeRO stage, pipeline schedule, microbatches,
micro-batch size, activation checkpointing and sequence parallelism; keeps what trainer.config.validate
accepts; prices each with parallel/plan_model.py; ranks those that fit by predicted tokens/s. Also the
trainer's hook that logs the prediction for its own layout and, once, against the measured figures.
Must not hold the cost model's formulas (plan_model.py) nor start anything distributed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

from parallel.mesh import AXES
from parallel.plan_model import GPUS, Knobs, Layout, ModelShape, get_gpu_key, get_knobs, predict
from trainer.config import (Config, ConfigError, check_writable, describe_error, get_micro_batch_size, get_microbatches,
                            load_config, parse_int, print_help, validate)

AC_MODES = ("none", "selective", "full")
PLAN_KEYS = ("recipe", "world_size", "gpu", "gpus_per_node", "top", "json", "calib")
MEASURED_AFTER_STEP = 20
MAX_MICRO_TOKENS = 2**16


def _powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(limit.bit_length()) if 2**k <= limit]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def get_shard_sizes(dp: int, tp: int, gpus_per_node: int) -> list[int]:
    """dp_shard choices for FSDP/HSDP: all of dp, or power-of-two groups of up to eight nodes."""
    sizes = {dp}
    sizes.update(s for s in _powers_of_two(dp) if dp % s == 0 and s * tp <= 8 * gpus_per_node)
    return sorted(sizes)


def get_schedules(pp: int, num_layers: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    interleaved = [("interleaved_1f1b", v) for v in (2, 4, 8) if pp * v <= num_layers]
    return [("gpipe", 1), ("1f1b", 1), *interleaved]


def get_microbatch_counts(pp: int, rows: int, interleaved: bool) -> list[int]:
    """Pipeline microbatches: the largest three of pp x 1, 2, 4, ... dividing the rows, and (not
    interleaved) all rows in one slice. Fewer only add bubble and FSDP gathers for the same micro-batch."""
    if pp == 1:
        return [1]
    counts = {pp * 2**k for k in range(rows.bit_length()) if rows % (pp * 2**k) == 0}
    if not interleaved:
        counts.add(rows)
    return sorted(counts)[-3:]


def get_micro_batch_sizes(rows: int, seq_len: int) -> list[int]:
    """Powers of two dividing the rows (and all rows), up to MAX_MICRO_TOKENS tokens: beyond that matmuls
    are saturated and a larger micro-batch only costs memory."""
    sizes = {b for b in _powers_of_two(rows) if rows % b == 0} | {rows}
    return sorted(b for b in sizes if b == 1 or b * seq_len <= MAX_MICRO_TOKENS)


def get_overrides(layout: Layout) -> list[str]:
    """The trainer CLI overrides that set `layout` over any recipe."""
    return [
        f"parallel.pp={layout.pp}", f"parallel.dp_replicate={layout.dp_replicate}",
        f"parallel.dp_shard={layout.dp_shard}", f"parallel.tp={layout.tp}", f"parallel.zero={layout.zero}",
        f"parallel.sequence_parallel={str(layout.sequence_parallel).lower()}",
        f"parallel.pp_schedule={layout.pp_schedule}", f"parallel.virtual_stages={layout.virtual_stages}",
        f"parallel.microbatches={layout.microbatches if layout.pp > 1 else 0}",
        f"train.micro_batch_size={layout.micro_batch_size}", f"train.activation_checkpointing={layout.ac}",
    ]


def describe_layout(layout: Layout) -> str:
    """'pp2 x dp_shard4 x tp2 zero3 1f1b m8 mbs1 ac=none'."""
    axes = [f"{name}{d}" for name, d in (("pp", layout.pp), ("dp_replicate", layout.dp_replicate),
                                         ("dp_shard", layout.dp_shard), ("tp", layout.tp)) if d > 1]
    parts = [" x ".join(axes) or "single"]
    if layout.dp > 1:
        parts.append(f"zero{layout.zero}")
    if layout.pp > 1:
        schedule = layout.pp_schedule + (f" v{layout.virtual_stages}" if layout.virtual_stages > 1 else "")
        parts.append(f"{schedule} m{layout.microbatches}")
    if layout.sequence_parallel:
        parts.append("sp")
    parts += [f"mbs{layout.micro_batch_size}", f"ac={layout.ac}"]
    return " ".join(parts)


def apply_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of cfg with the layout set (dataclasses.replace: cheap enough for 10^5 layouts)."""
    parallel = dataclasses.replace(
        cfg.parallel, pp=layout.pp, dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp,
        zero=layout.zero, sequence_parallel=layout.sequence_parallel, pp_schedule=layout.pp_schedule,
        virtual_stages=layout.virtual_stages, microbatches=layout.microbatches if layout.pp > 1 else 0)
    train = dataclasses.replace(cfg.train, micro_batch_size=layout.micro_batch_size, activation_checkpointing=layout.ac)
    return dataclasses.replace(cfg, parallel=parallel, train=train)


def enumerate_layouts(cfg: Config, *, world_size: int, gpus_per_node: int) -> tuple[list[Layout], int]:
    """(layouts trainer.config.validate accepts for world_size, how many were tried)."""
    m, batch = cfg.model, cfg.train.global_batch_size
    tps = [t for t in _powers_of_two(min(gpus_per_node, world_size))
           if world_size % t == 0 and gpus_per_node % t == 0
           and not (m.num_heads % t or m.num_kv_heads % t or m.ffn_dim % t or m.vocab_size % t)]
    layouts, tried = [], 0
    for tp in tps:
        for pp in (p for p in _divisors(world_size // tp) if p <= m.num_layers):
            dp = world_size // (tp * pp)
            if batch % dp:
                continue
            rows = batch // dp
            splits = [(0, 1, 1)] if dp == 1 else []
            if dp > 1 and tp == 1:
                splits += [(0, dp, 1), (1, 1, dp)]
            if dp > 1:
                splits += [(zero, dp // s, s) for zero in (2, 3) for s in get_shard_sizes(dp, tp, gpus_per_node)]
            mbs_options = get_micro_batch_sizes(rows, cfg.train.seq_len)
            for zero, replicate, shard in splits:
                for schedule, virtual in get_schedules(pp, m.num_layers):
                    for mbs in mbs_options:
                        for microbatches in get_microbatch_counts(pp, rows // mbs, virtual > 1):
                            for sp in ((False, True) if tp > 1 else (False,)):
                                layout = Layout(pp, replicate, shard, tp, zero, schedule, virtual, microbatches,
                                                mbs, "none", sp)
                                tried += len(AC_MODES)
                                try:  # the checkpointing mode takes no part in validate's cross-field checks
                                    validate(apply_layout(cfg, layout), world_size)
                                except ConfigError:
                                    continue
                                layouts += [dataclasses.replace(layout, ac=ac) for ac in AC_MODES]
    return layouts, tried


def _entry(layout: Layout, prediction: dict) -> dict:
    return {"overrides": get_overrides(layout), "layout": describe_layout(layout),
            "degrees": {"pp": layout.pp, "dp_replicate": layout.dp_replicate, "dp_shard": layout.dp_shard,
                        "tp": layout.tp}, **prediction}


def _lookup_gpu(gpu: str | None):
    if not gpu:  # this machine's GPU, when it has one
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"gpu: required without a CUDA device; one of {sorted(GPUS)}")
        gpu = torch.cuda.get_device_name()
    try:
        return GPUS[get_gpu_key(gpu)]
    except KeyError:
        raise ConfigError(f"gpu={gpu!r}: no entry in the planner's table; known: {sorted(GPUS)}") from None


def _knobs(gpu, calibration: dict | None) -> Knobs:
    try:
        return get_knobs(gpu, calibration)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def plan_layouts(cfg: Config, *, world_size: int, gpu: str | None, gpus_per_node: int = 8,
                 calibration: dict | None = None) -> list[dict]:
    """Every valid layout of cfg's recipe for world_size GPUs, best first: those that fit by predicted
    tokens/s (ties: less memory), then those that do not by memory. Each entry: overrides, layout, degrees,
    fits, pred_mem_gb (GiB), pred_step_s, pred_tokens_per_s, pred_mfu, breakdown {mem, time}. gpu: a table
    key or device name ('h100', 'NVIDIA H200'); None means this machine's CUDA device. cfg's own layout is
    ignored (it need not be valid for world_size)."""
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError(f"world_size={world_size}, gpus_per_node={gpus_per_node}: must be >= 1")
    spec = _lookup_gpu(gpu)
    knobs = _knobs(spec, calibration)
    shape = ModelShape(cfg)
    layouts, _ = enumerate_layouts(cfg, world_size=world_size, gpus_per_node=gpus_per_node)
    entries = [_entry(layout, predict(shape, layout, spec, knobs, gpus_per_node=gpus_per_node)) for layout in layouts]
    entries.sort(key=lambda e: (not e["fits"], -e["pred_tokens_per_s"] if e["fits"] else 0, e["pred_mem_gb"]))
    return entries


def get_layout(cfg: Config, degrees: dict[str, int]) -> Layout:
    p, pp = cfg.parallel, degrees["pp"]
    microbatches = get_microbatches(p, pp) if pp > 1 else 1
    micro_batch_size = get_micro_batch_size(cfg.train, degrees["dp_replicate"] * degrees["dp_shard"], microbatches)
    return Layout(pp, degrees["dp_replicate"], degrees["dp_shard"], degrees["tp"], p.zero, p.pp_schedule,
                  p.virtual_stages, microbatches, micro_batch_size,
                  cfg.train.activation_checkpointing, p.sequence_parallel and degrees["tp"] > 1)


def predict_layout(cfg: Config, degrees: dict[str, int], *, gpu: str, gpus_per_node: int = 8,
                   calibration: dict | None = None) -> dict:
    """The prediction for the layout cfg already has (degrees as trainer.config.validate resolved them)."""
    spec = _lookup_gpu(gpu)
    validate(cfg, math.prod(degrees[a] for a in AXES))
    layout = get_layout(cfg, degrees)
    prediction = predict(ModelShape(cfg), layout, spec, _knobs(spec, calibration), gpus_per_node=gpus_per_node)
    return _entry(layout, prediction)


# ---------------------------------------------------------------------------------------------
# Calibration: a JSON of knobs, or bench.jsonl records (trainer/bench.py) the knobs are fitted to.


def _record_config(record: dict, cache: dict) -> Config:
    recipe = record["recipe"]
    if recipe not in cache:
        cache[recipe] = load_config([f"recipe={recipe}"], world_size=1)
    cfg = cache[recipe]
    batch = int(record["batch"])
    train = dataclasses.replace(
        cfg.train, global_batch_size=batch, micro_batch_size=int(record.get("micro_batch_size", batch)),
        seq_len=int(record.get("seq_len", cfg.train.seq_len)), precision=record.get("precision", cfg.train.precision),
        compile=bool(record.get("compile", cfg.train.compile)),
        activation_checkpointing=record.get("activation_checkpointing", cfg.train.activation_checkpointing),
        fused_loss=bool(record.get("fused_loss", cfg.train.fused_loss)),
        fp8_output=bool(record.get("fp8_output", cfg.train.fp8_output)))
    return dataclasses.replace(cfg, train=train)


def fit_calibration(records: list[dict], *, precision: str | None = None) -> tuple[dict, list[str]]:
    """Knobs fitted to one-process bench records: mfu such that the predicted step equals the measured one,
    mem_overhead_gb = measured peak - predicted peak without overhead (medians over the records).
    Records of `precision` are used when there are any. Returns (knobs, notes)."""
    notes, cache, fits = [], {}, []
    # The cost model has no term for fast float8 accumulation: such a record would inflate the fitted mfu.
    usable = [r for r in records if r.get("world_size", 1) == 1 and r.get("tokens_per_s") and not r.get("fp8_fast_accum")]
    if len(usable) < len(records):
        skipped = len(records) - len(usable)
        notes.append(f"calib: {skipped} record(s) skipped (more than one process, no tokens_per_s, or fp8_fast_accum)")
    if precision and any(r.get("precision") == precision for r in usable):
        usable = [r for r in usable if r.get("precision") == precision]
    for record in usable:
        try:
            cfg = _record_config(record, cache)
            spec = GPUS[get_gpu_key(record.get("device", ""))]
        except (KeyError, ConfigError, ValueError) as exc:
            notes.append(f"calib: record skipped ({type(exc).__name__}: {exc})")
            continue
        shape = ModelShape(cfg)
        layout = get_layout(cfg, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1})
        measured_step = cfg.train.global_batch_size * cfg.train.seq_len / record["tokens_per_s"]
        low, high = 1e-3, 2.0  # the predicted step falls as mfu rises: bisect
        for _ in range(40):
            mid = (low + high) / 2
            step = predict(shape, layout, spec, Knobs(mfu=mid), gpus_per_node=1)["pred_step_s"]
            low, high = (mid, high) if step > measured_step else (low, mid)
        if high > 1.99 or low < 2e-3:
            notes.append(f"calib: record skipped (its step time is not compute-bound in the model: {record})")
            continue
        entry = {"mfu": (low + high) / 2}
        if record.get("peak_mem_gb") is not None:
            bare = predict(shape, layout, spec, Knobs(mfu=entry["mfu"], mem_overhead_gb=0.0), gpus_per_node=1)
            entry["mem_overhead_gb"] = record["peak_mem_gb"] - bare["pred_mem_gb"]
        fits.append(entry)
    if not fits:
        raise ConfigError("calib: no usable bench record (needs world_size 1, recipe, batch, tokens_per_s, device)")
    knobs = {"mfu": round(statistics.median(f["mfu"] for f in fits), 4)}
    overheads = [f["mem_overhead_gb"] for f in fits if "mem_overhead_gb" in f]
    if overheads:
        knobs["mem_overhead_gb"] = round(statistics.median(overheads), 3)
    notes.append(f"calib: fitted to {len(fits)} record(s): {knobs}")
    return knobs, notes


def load_calibration(path: str, *, precision: str | None = None) -> tuple[dict, list[str]]:
    """A {"mfu", "mem_overhead_gb", "dp_overlap"} JSON file, or bench JSON lines to fit those to."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"calib={path!r}: no such file")
    try:
        text = file.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"calib={path!r}: neither JSON nor JSON lines ({exc})") from None
    if isinstance(data, dict) and "tokens_per_s" not in data:
        known = {"mfu", "mem_overhead_gb", "dp_overlap"}
        bad = [k for k, v in data.items() if k not in known or isinstance(v, bool) or not isinstance(v, (int, float))
               or not math.isfinite(v)]
        if bad:
            raise ConfigError(f"calib={path!r}: {bad[0]}={data[bad[0]]!r}: knobs are numbers named {sorted(known)}")
        return data, [f"calib: {data}"]
    records = data if isinstance(data, list) else [data]
    if not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"calib={path!r}: bench records are JSON objects, one per line (trainer.bench writes them)")
    return fit_calibration(records, precision=precision)


# ---------------------------------------------------------------------------------------------
# The trainer's hook: the prediction at start, and once against what was measured.


class PlannerCheck:
    """Logs the planner's prediction for the running layout, then once (first log step after step 20, or
    the last step) predicted against measured memory and step time. Never raises: a planner problem must
    not stop training, so it logs one line instead."""

    def __init__(self, cfg: Config, degrees: dict[str, int], device, *, log):
        self.log, self.prediction, self.reported = log, None, False
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        try:
            if device.type == "cuda":
                import torch

                device_name, gpus_per_node = torch.cuda.get_device_name(device), torch.cuda.device_count()
            else:  # every process on one host
                device_name, gpus_per_node = device.type, math.prod(degrees[a] for a in AXES)
            try:
                gpu = get_gpu_key(device_name)
            except KeyError:
                log(f"planner: no GPU entry for {device_name!r} (known: {', '.join(sorted(GPUS))}); no prediction")
                return
            self.prediction = predict_layout(cfg, degrees, gpu=gpu, gpus_per_node=gpus_per_node)
            log(describe_prediction(self.prediction, gpu))
        except Exception as exc:  # noqa: BLE001 (see the docstring)
            log(f"planner: no prediction ({describe_error(exc)})")

    def maybe_log(self, step: int, total_steps: int, metrics: dict) -> None:
        if self.prediction is None or self.reported or (step <= MEASURED_AFTER_STEP and step < total_steps):
            return
        self.reported = True
        tokens_per_s, mem = metrics.get("tokens_per_s"), metrics.get("mem_gb")
        measured_step = self.tokens_per_step / tokens_per_s if tokens_per_s else float("nan")
        p = self.prediction
        self.log(f"planner: predicted {p['pred_mem_gb']:.1f} GiB / {p['pred_step_s']:.3g} s per step, "
                 f"measured {mem:.1f} GiB / {measured_step:.3g} s (step {step})")


def describe_prediction(prediction: dict, gpu: str) -> str:
    mem, times = prediction["breakdown"]["mem"], prediction["breakdown"]["time"]
    top = sorted(((k, v) for k, v in mem.items() if isinstance(v, float) and k not in ("total", "overhead")),
                 key=lambda kv: -kv[1])[:3]
    fits = "fits" if prediction["fits"] else f"does NOT fit {GPUS[gpu].hbm_gib:g} GiB"
    return (f"planner ({gpu}): {prediction['layout']}: predicted {prediction['pred_mem_gb']:.1f} GiB peak ({fits}; "
            + ", ".join(f"{k} {v:.3g}" for k, v in top)
            + f"), {prediction['pred_step_s']:.3g} s/step, {prediction['pred_tokens_per_s']:,.0f} tokens/s, "
            f"MFU {100 * prediction['pred_mfu']:.1f}% (compute {times['compute']:.3g} s, "
            f"bubble {100 * times['bubble_fraction']:.0f}%, exposed dp {times['dp_exposed']:.3g} s)")


# ---------------------------------------------------------------------------------------------
# CLI


def format_table(entries: list[dict], top: int) -> str:
    width = max([len(e["layout"]) for e in entries[:top]] + [6])
    header = (f"{'#':>3}  {'layout':<{width}} {'fits':<4} {'mem GiB':>8} {'step s':>9} {'tokens/s':>12} {'MFU':>6} "
              f"{'bubble':>6} {'dp exp s':>9}")
    lines = [header, "-" * len(header)]
    for i, e in enumerate(entries[:top], 1):
        t = e["breakdown"]["time"]
        lines.append(f"{i:>3}  {e['layout']:<{width}} {'yes' if e['fits'] else 'NO':<4} {e['pred_mem_gb']:>8.1f} "
                     f"{e['pred_step_s']:>9.4g} {e['pred_tokens_per_s']:>12,.0f} {100 * e['pred_mfu']:>5.1f}% "
                     f"{100 * t['bubble_fraction']:>5.1f}% {t['dp_exposed']:>9.3g}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if print_help(argv, __doc__, end="Enumerates"):
        return 0
    options, overrides = {}, []
    for item in argv:
        key, _, value = item.partition("=")
        if key in PLAN_KEYS and key != "recipe":
            options[key] = value
        else:
            overrides.append(item)
    try:
        for key in ("world_size", "gpu"):
            if not options.get(key):
                raise ConfigError(f"{key}: required (python -m parallel.plan recipe=NAME world_size=N gpu=h100 ...)")
        world_size = parse_int("world_size", options["world_size"], minimum=1)
        gpus_per_node = parse_int("gpus_per_node", options.get("gpus_per_node", "8"), minimum=1)
        top = parse_int("top", options.get("top", "20"), minimum=1)
        spec = _lookup_gpu(options["gpu"])
        out = check_writable("json", options["json"], folder=False) if "json" in options else None
        if "calib" in options and not options["calib"]:
            raise ConfigError("calib='': must name a file")
        # The recipe's own layout may not fit world_size; the planner replaces it anyway.
        try:
            cfg = load_config(overrides, world_size=1)
        except ConfigError:
            cfg = load_config(overrides + ["parallel.pp=1", "parallel.tp=1", "parallel.dp_replicate=1",
                                           "parallel.dp_shard=1", "parallel.sequence_parallel=false",
                                           "parallel.virtual_stages=1"], world_size=1)
        calibration = None
        if options.get("calib"):
            calibration, notes = load_calibration(options["calib"], precision=cfg.train.precision)
            print("\n".join(notes))
        start = time.perf_counter()
        entries = plan_layouts(cfg, world_size=world_size, gpu=options["gpu"], gpus_per_node=gpus_per_node,
                               calibration=calibration)
        elapsed = time.perf_counter() - start
        if out is not None:  # written before the table, so a failed write is the only line printed
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"recipe": cfg.recipe, "world_size": world_size, "gpu": options["gpu"],
                                           "gpus_per_node": gpus_per_node, "calibration": calibration,
                                           "layouts": entries}) + "\n")
            except OSError as exc:
                raise ConfigError(f"json={options['json']!r}: cannot write ({exc.strerror or exc})") from None
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fitting = sum(e["fits"] for e in entries)
    print(f"plan: {cfg.recipe}, {world_size} x {options['gpu']} ({gpus_per_node}/node), batch "
          f"{cfg.train.global_batch_size} x {cfg.train.seq_len}, {cfg.train.precision}"
          f"{' + compile' if cfg.train.compile else ''}: {len(entries)} valid layouts, {fitting} fit, "
          f"in {elapsed:.2f} s")
    if entries:
        print(format_table(entries, top))
    if fitting:
        print(f"best: {' '.join(entries[0]['overrides'])}")
    elif entries:  # ranked by memory when none fits: the first needs the least
        print(f"best: none fits: the smallest predicted peak is {entries[0]['pred_mem_gb']:.1f} GiB per GPU "
              f"({entries[0]['layout']}), over the {spec.hbm_gib - spec.untracked_gb:.1f} GiB usable of "
              f"{options['gpu']}'s {spec.hbm_gib:g} GiB")
    else:
        print("no valid layout: check that the global batch divides by the data-parallel degrees")
    if out is not None:
        print(f"wrote {len(entries)} layouts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
