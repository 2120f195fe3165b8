"""Layout sweeps: run one recipe under several layouts and tabulate what each measured.

    python -m trainer.sweep recipe=debug nproc=2 steps=8 out=runs/sweep layouts="pp=1,tp=2;pp=2,tp=1"
    python -m trainer.sweep recipe=debug nproc=2 -m parallel.tp=1,2 parallel.dp_shard=2,1
    python -m trainer.sweep recipe=bench_1b nproc=8 top=4 gpu=H100 [dry_run=true]

Points come from an explicit `layouts` list (";" between points, "," between keys; a bare key means
parallel.KEY, and `nproc` may vary per point), from a hydra-multirun-like cartesian product (`-m`, then
`key=a,b,...`), or from the planner's top K layouts that fit (`parallel.plan.plan_layouts`). Every other
`key=value` is an override for all points. Each point is validated for its process count first (a rejected
point is recorded with the validator's message and not run), priced by the planner for its device
(`predict_layout` for its layout; gpu= or the local CUDA device), then runs as
`torchrun --standalone --nproc_per_node=N -m trainer.bench ...` in its own run dir under `out`; a failure is
recorded with its error line and the sweep goes on. Results go to out/results.json and out/results.csv,
rewritten after every point, with the planner's predictions beside the measurements when it has them.
Must not hold a training loop or a performance model: trainer/bench.py measures, parallel/plan.py predicts.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


from parallel import plan as planner
from trainer.bench import check_warmup
from trainer.config import (Config, ConfigError, check_writable, describe_error, load_config, parse_int, print_help,
                            validate)

SWEEP_KEYS = ("recipe", "nproc", "steps", "warmup", "out", "layouts", "top", "gpu", "timeout", "dry_run")
PREDICTION_KEYS = ("fits", "pred_mem_gb", "pred_step_s", "pred_tokens_per_s")
MEASURED_KEYS = ("tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "final_loss")
CSV_COLUMNS = ("index", "layout", "nproc", "status", "tokens_per_s", "tokens_per_s_per_device", "mfu",
               "peak_mem_gb", "final_loss", "step_s", "pred_tokens_per_s", "pred_step_s", "pred_mem_gb", "fits",
               "wall_s", "run_dir", "error")
# The neutral layout the planner's input config is loaded with when the recipe's own layout does not fit nproc.
NEUTRAL_LAYOUT = ["parallel.pp=1", "parallel.tp=1", "parallel.dp_replicate=1", "parallel.dp_shard=-1", "parallel.zero=3"]
# One process, nothing split: what the shared overrides are checked under (as parallel/plan.py's CLI loads a recipe).
SHARED_CHECK_LAYOUT = NEUTRAL_LAYOUT + ["parallel.sequence_parallel=false", "parallel.virtual_stages=1"]
BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _qualify(key: str) -> str:
    return key if "." in key or key == "nproc" else f"parallel.{key}"


def parse_layouts(text: str) -> list[list[str]]:
    """"pp=1,tp=2;pp=2,tp=1" -> [["parallel.pp=1", "parallel.tp=2"], ["parallel.pp=2", "parallel.tp=1"]]."""
    points = []
    for chunk in text.split(";"):
        items = [item.strip() for item in chunk.split(",") if item.strip()]
        for item in items:
            if "=" not in item:
                raise ConfigError(f"layouts: {item!r} is not key=value (points are 'pp=2,tp=1;...')")
        points.append([_qualify(k) + "=" + v for k, v in (item.split("=", 1) for item in items)])
    return [p for p in points if p]


def expand_multirun(items: list[str]) -> list[list[str]]:
    """Cartesian product of every `key=a,b,...` (hydra multirun order: the last key varies fastest)."""
    axes = []
    for item in items:
        key, value = item.split("=", 1)
        axes.append([f"{key}={v}" for v in value.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def get_label(point: list[str]) -> str:
    return ",".join(item.removeprefix("parallel.") for item in point) or "recipe"


def get_plans(cfg: Config, world_size: int, gpu: str) -> list[dict] | None:
    """The planner's ranked layouts, or None (with one line said) when it fails."""
    try:
        return planner.plan_layouts(cfg, world_size=world_size, gpu=gpu)
    except Exception as exc:  # a planner bug must not stop measurements
        print(f"sweep: planner failed ({describe_error(exc)}); no predicted figures")
        return None


def get_prediction(cfg: Config, world_size: int, gpu: str) -> dict | None:
    """The planner's figures for the layout a point's config has, or None (with one line said) when it fails."""
    try:
        return planner.predict_layout(cfg, validate(cfg, world_size), gpu=gpu)
    except Exception as exc:  # a planner bug must not stop measurements
        print(f"sweep: planner failed ({describe_error(exc)}); no predicted figures")
        return None


def load_for_planner(base: list[str], world_size: int) -> Config:
    try:
        return load_config(base, world_size=world_size)
    except ConfigError:
        return load_config(base + NEUTRAL_LAYOUT, world_size=world_size)


def get_error_line(text: str) -> str:
    """The most telling line of a failed run's output: our one-line `error:`, else the first exception line
    (the root cause comes before the other ranks' follow-on errors and torchrun's summary), else the last line."""
    lines = [re.sub(r"^\[(default)?rank\d+\]:\s*", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    for pattern in (r"^error: ", r"^[\w.]*(Error|Exception|Interrupt)\b:?"):
        found = [line for line in lines if re.search(pattern, line) and "ChildFailedError" not in line]
        if found:
            return found[0][:500]
    return lines[-1][:500] if lines else "no output"


def run_point(command: list[str], run_dir: Path, timeout_s: float) -> tuple[int, str]:
    """Run one point in its own session (so a timeout ends the whole torchrun tree); return (rc, output)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "sweep.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.write(f"\nerror: timed out after {timeout_s:g} s\n")
            rc = 124
    return rc, log_path.read_text(errors="replace")


def write_results(out: Path, header: dict, points: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps({**header, "points": points}, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for point in points:
            writer.writerow({k: ("" if point.get(k) is None else point.get(k)) for k in CSV_COLUMNS})


def _seconds(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: must be a number of seconds") from None
    if not 0 < number < math.inf:
        raise ConfigError(f"{key}={value!r}: must be a finite number of seconds > 0")
    return number


def _bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered not in BOOLEANS:
        raise ConfigError(f"{key}={value!r}: must be one of {'/'.join(BOOLEANS)}")
    return BOOLEANS[lowered]


def check_shared(base: list[str], points: list[list[str]], nproc: int) -> Config:
    """The overrides every point shares, less the keys some point sets: when they fail under no layout at all
    (one process, nothing split) and under the recipe's own for nproc, every point would be rejected for the
    same reason, so the sweep stops before writing anything."""
    varied = {item.split("=", 1)[0] for point in points for item in point}
    shared = [item for item in base if item.split("=", 1)[0] not in varied]
    try:
        return load_config(shared + SHARED_CHECK_LAYOUT, world_size=1)
    except ConfigError as exc:
        try:  # a setting tied to the process count (fault.inject_rank) can need nproc
            return load_config(shared, world_size=nproc)
        except ConfigError:
            raise exc from None


def parse_args(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """(sweep settings, overrides for every point, multirun axes)."""
    settings, base, axes, multirun = {}, [], [], False
    for item in argv:
        if item in ("-m", "--multirun"):
            multirun = True
            continue
        if "=" not in item:
            raise ConfigError(f"{item!r}: arguments take the form key=value (or -m before key=a,b lists)")
        key, value = item.split("=", 1)
        if key in SWEEP_KEYS:
            settings[key] = value
        elif multirun and "," in value and not value.startswith(("[", "{")):
            axes.append(item)
        elif "," in value and not value.startswith(("[", "{")):
            raise ConfigError(f"{item!r}: a list of values sweeps only after -m (hydra multirun syntax)")
        else:
            base.append(item)
    chosen = [k for k in ("layouts", "top") if k in settings] + (["-m"] if axes else [])
    if len(chosen) > 1:
        raise ConfigError(f"choose one source of points, not {chosen}")
    return settings, base, axes


def get_points(settings: dict, axes: list[str], base: list[str], nproc: int, gpu: str | None) -> list[tuple]:
    """(overrides, label or None, planner entry or None) for each point, from the one source chosen."""
    if "top" in settings:
        top = parse_int("top", settings["top"], minimum=1)
        if gpu is None:
            raise ConfigError("top=K needs gpu=NAME (the planner's device; no CUDA device here)")
        plans = get_plans(load_for_planner(base, nproc), nproc, gpu)
        if plans is None:
            raise ConfigError("top=K: the planner failed (see above)")
        fitting = [p for p in plans if p.get("fits", True)]
        if not fitting:
            raise ConfigError(f"top={top}: none of the planner's {len(plans)} layouts for {nproc} x {gpu} fits")
        print(f"sweep: planner ranked {len(plans)} layouts for {nproc} x {gpu}, {len(fitting)} fit; "
              f"running the top {min(top, len(fitting))}")
        # The planner's short description names the point, where it gives one.
        return [(list(p["overrides"]), p.get("layout"), p) for p in fitting[:top]]
    if "layouts" in settings:
        points = parse_layouts(settings["layouts"])
        if not points:
            raise ConfigError(f"layouts={settings['layouts']!r}: no points")
    elif axes:
        points = expand_multirun(axes)
    else:
        points = [[]]
    return [(point, None, None) for point in points]


def run_bench(cfg: Config, command: list[str], run_dir: Path, timeout_s: float, result: dict) -> None:
    """Run one point's trainer.bench and fill `result` with its figures or its error line."""
    start = time.perf_counter()
    bench_file = run_dir / "bench.jsonl"
    bench_file.unlink(missing_ok=True)  # a rerun into the same dir must not read the last sweep's figures
    rc, output = run_point(command, run_dir, timeout_s)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    records = [json.loads(line) for line in bench_file.read_text().splitlines()] if bench_file.is_file() else []
    if rc == 0 and records:
        result["status"] = "ok"
        for key in MEASURED_KEYS:
            result[key] = records[-1].get(key)
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        result["step_s"] = round(tokens_per_step / result["tokens_per_s"], 6) if result["tokens_per_s"] else None
        print(f"    ok: {result['tokens_per_s']:,} tokens/s, peak {result['peak_mem_gb']} GiB, loss {result['final_loss']}")
    else:
        result["status"] = "failed"
        result["error"] = f"exit {rc}: {get_error_line(output)}" if rc else "no bench.jsonl written"
        print(f"    failed: {result['error']} (log: {run_dir / 'sweep.log'})")


def sweep(argv: list[str]) -> list[dict]:
    settings, base, axes = parse_args(argv)
    nproc = parse_int("nproc", settings.get("nproc", "1"), minimum=1)
    steps = parse_int("steps", settings.get("steps", "60"), minimum=1)
    warmup = parse_int("warmup", settings["warmup"]) if "warmup" in settings else (20 if steps > 20 else steps // 2)
    check_warmup(warmup, steps, None)
    timeout_s = _seconds("timeout", settings.get("timeout", "1800"))
    recipe = settings.get("recipe", "default")
    out = check_writable("out", settings.get("out", f"runs/sweep_{Path(recipe).stem}"), folder=True)
    gpu = settings.get("gpu")
    if gpu == "":
        raise ConfigError("gpu='': must name a GPU (e.g. gpu=H100)")
    if gpu is None:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dry_run = _bool("dry_run", settings.get("dry_run", "false"))
    # Fixed for every point: log steps at warmup and at the end (bench reads them), no checkpoints unless asked.
    fixed = [f"train.steps={steps}"]
    if not any(o.startswith("log.every=") for o in base):
        fixed.append(f"log.every={math.gcd(warmup, steps)}")
    if not any(o.startswith("checkpoint.enabled=") for o in base):
        fixed.append("checkpoint.enabled=false")
    base = [f"recipe={recipe}", *base, *fixed, "log.progress=lines"]
    points = get_points(settings, axes, base, nproc, gpu)
    # Checked before anything is written: a bad shared setting or a bad per-point nproc is one error, not N rejections.
    shared = check_shared(base, [point for point, _, _ in points], nproc)
    if not any(i.startswith("log.every=") for point, _, _ in points for i in point):
        check_warmup(warmup, steps, shared.log.every)
    point_nprocs = [next((parse_int("nproc", v, minimum=1) for k, v in (i.split("=", 1) for i in point)
                          if k == "nproc"), nproc)
                    for point, _, _ in points]

    out.mkdir(parents=True, exist_ok=True)
    header = {"recipe": recipe, "nproc": nproc, "steps": steps, "warmup": warmup, "gpu": gpu, "overrides": base}
    results = []
    for index, ((point, label, prediction), point_nproc) in enumerate(zip(points, point_nprocs)):
        overrides = [item for item in point if not item.startswith("nproc=")]
        label = label or get_label(point)
        processes = f"{point_nproc} process" + ("es" if point_nproc > 1 else "")
        run_dir = out / f"{index:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')[:60]}"
        # Absolute, so a report run from any folder finds the point's metrics.
        result = {"index": index, "layout": label, "overrides": overrides, "nproc": point_nproc,
                  "run_dir": str(run_dir.absolute()), "status": "rejected", "error": None}
        results.append(result)
        try:
            cfg = load_config(base + overrides + [f"run.dir={run_dir}"], world_size=point_nproc)
        except ConfigError as exc:
            result["error"] = str(exc)
            print(f"[{index + 1}/{len(points)}] {label}: rejected: {exc}")
            write_results(out, header, results)
            continue
        if prediction is None and gpu is not None:
            prediction = get_prediction(cfg, point_nproc, gpu)
        for key in PREDICTION_KEYS:
            result[key] = prediction.get(key) if prediction else None
        if dry_run:
            result["status"] = "planned"
            print(f"[{index + 1}/{len(points)}] {label}: valid ({processes})")
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={point_nproc}",
                       "-m", "trainer.bench", f"warmup={warmup}", *base, *overrides, f"run.dir={run_dir}"]
            print(f"[{index + 1}/{len(points)}] {label}: running ({processes}) in {run_dir}", flush=True)
            run_bench(cfg, command, run_dir, timeout_s, result)
        write_results(out, header, results)
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "failed", "rejected", "planned")}
    print(f"sweep: {', '.join(f'{n} {s}' for s, n in counts.items() if n)} -> {out / 'results.csv'}, {out / 'results.json'}")
    return results


def main(argv: list[str]) -> int:
    if print_help(argv, __doc__, end="Points come from"):
        print(f"\nsettings: {', '.join(SWEEP_KEYS)}; any other key=value is an override for every point")
        return 0
    try:
        sweep(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
