"""Roofline report: where a training step's time goes, how close each kind of kernel runs to the roofs,
and what to change, in plain words naming the config key.

    python -m trainer.roofline recipe=NAME [key=value ...]

runs the normal trainer with profile.roofline=true and train.steps = profile.start_step +
profile.steps + 1 (unless given); any run with profile.roofline=true writes the same report to
<run.dir>/roofline/: roofline.md, roofline.json and roofline.png (log-log roofline: kernel classes
as points sized by their time share, the compute roofs per dtype, the bandwidth roof, the ridge),
with the heaviest kernels of each class.
trainer/profiling.py runs the window and calls `build_report`; trainer/trace_analysis.py
classifies the trace; trainer/roofs.py measures the roofs.

Diagnosis rules (share = fraction of the measured step; one line each, strongest first):
data loading (idle in next_batch >= 10%), host sync (a .item()-like read inside train_step, or on
GPU >= 3% idle right after syncs), host overhead (other idle >= 10%), many tiny kernels (median <
10 us and >= 500 per step), host-to-device copies (>= 1%), exposed communication (>= 10%), matmuls
under half their roof (matmul share >= 10%), memory-bound elementwise (>= 25%), loss (>= 10%),
optimizer (>= 10%). Must not hold the profiling window or the trace parsing.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config
from trainer.report import markdown_table
from trainer.roofs import Roofs
from trainer.trace_analysis import CLASSES

DATA_IDLE, SYNC_IDLE, HOST_IDLE = 0.10, 0.03, 0.10
TINY_KERNEL_US, TINY_KERNELS_PER_STEP = 10.0, 500
HTOD_SHARE, COMM_SHARE = 0.01, 0.10
MATMUL_SHARE, MATMUL_ROOF_FRACTION = 0.10, 0.5
ELEMENTWISE_SHARE, LOSS_SHARE, OPTIMIZER_SHARE = 0.25, 0.10, 0.10
# Below this fraction of its roof a class's work is unseen (kernels without recorded shapes), not slow.
PLOTTED_ROOF_FRACTION = 1e-3


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def diagnose(analysis: dict, settings: dict) -> list[str]:
    """Classic profiler signatures, one line each, strongest first. `settings`: device ('cuda'|'cpu'),
    compile, precision, fused_loss, optim_fused, optim_compile."""
    found: list[tuple[float, str]] = []
    classes, idle = analysis["classes"], analysis["idle"]
    gpu = settings["device"] == "cuda"
    if not settings["compile"]:
        fewer_kernels = "train.compile=true fuses small ops into fewer, larger kernels"
    elif gpu:
        fewer_kernels = "train.compile is on: CUDA graphs would remove the remaining launches"
    else:
        fewer_kernels = "train.compile is on: larger ops (train.micro_batch_size) amortise the rest"

    data = idle["data_loading"]["share"]
    if data >= DATA_IDLE:
        found.append((data, f"data loading: idle {_pct(data)} of the step while the host is in next_batch, so the "
                            "device waits on the host's data; make batches cheaper or ready them ahead (data.*; "
                            "data.synthetic=true measures the step without data)"))
    syncs, sync_idle = analysis["syncs_in_train_step_per_step"], idle["host_sync"]["share"]
    if syncs >= 1 or (gpu and sync_idle >= SYNC_IDLE):
        where = f"{syncs:.0f} .item()-like reads per step inside train_step (forward/backward)" if syncs >= 1 else \
            "device-to-host reads (.item(), cudaStreamSynchronize)"
        found.append((max(sync_idle, 0.01 * syncs),
                      f"host sync: {where}, idle {_pct(sync_idle)} of the step after syncs; each one drains the "
                      "device queue and the host must refill it: read device values only at log steps (log.every)"))
    other = idle["host_other"]["share"]
    if other >= HOST_IDLE:
        what = "the device idles between kernels while the host launches them" if gpu else \
            "time outside ops (Python, dispatch, autograd bookkeeping)"
        found.append((other, f"host overhead: {_pct(other)} of the step is {what}; {fewer_kernels}"))
    kernels = analysis["kernels"]
    if kernels["median_us"] < TINY_KERNEL_US and kernels["per_step"] >= TINY_KERNELS_PER_STEP:
        # Ranked with the host overhead it causes: its own time is already in the classes.
        found.append((other, f"many tiny kernels: {kernels['per_step']:,.0f} per step, median "
                             f"{kernels['median_us']:.1f} us, so launch and dispatch costs dominate; {fewer_kernels}"))
    htod = analysis["htod"]
    htod_share = htod["time_ms"] / analysis["window_ms"] if analysis["window_ms"] else 0.0
    if htod_share >= HTOD_SHARE:
        found.append((htod_share, f"host-to-device copies: {htod['per_step']:.0f} per step, {_pct(htod_share)} of the step"
                                  + (", from pageable memory" if htod["pageable"] else "")
                                  + "; pin the batch (pinned memory) and copy with non_blocking=True "
                                    "(trainer/train.py train_step; no config key yet)"))
    comm = classes["communication"]["share"]
    if comm >= COMM_SHARE:
        c = analysis["communication"]
        found.append((comm, f"communication not overlapped: {_pct(comm)} of the step waits on collectives "
                            f"({c['exposed_ms']:.3g} of {c['total_ms']:.3g} ms exposed); see parallel.* (parallel.zero=2 "
                            "keeps parameters gathered for backward, parallel.dp_replicate (HSDP) keeps all-gathers "
                            "within a node, parallel.tp only within a node)"))
    matmul = classes["matmul"]
    below_roof = matmul["roof_fraction"] is not None and matmul["roof_fraction"] < MATMUL_ROOF_FRACTION
    if matmul["share"] >= MATMUL_SHARE and below_roof:
        fp8 = "" if settings["precision"] == "fp8" else ", train.precision=fp8 (a higher roof)"
        found.append((matmul["share"] * (1 - matmul["roof_fraction"]),
                      f"matmuls at {_pct(matmul['roof_fraction'])} of their roof ({matmul['tflops']:.3g} of "
                      f"{matmul['roof_tflops']:.3g} TFLOP/s) for {_pct(matmul['share'])} of the step: shapes (model.dim, "
                      f"model.ffn_dim multiples of 128, a larger train.micro_batch_size){fp8}"
                      + ("" if settings["compile"] else ", fusion of their neighbours (train.compile=true)")))
    elementwise = classes["norm/elementwise"]
    if elementwise["share"] >= ELEMENTWISE_SHARE and elementwise["bound"] != "compute":
        heaviest = analysis["top_kernels"].get("norm/elementwise")
        named = f"; the heaviest is {heaviest[0]['name']} at {heaviest[0]['time_ms']:.3g} ms/step" if heaviest else ""
        fix = "train.compile=true fuses norms, activations and residual adds" if not settings["compile"] else \
            f"already compiled: see the top kernels{named} (profile.trace=true for the rest)"
        found.append((elementwise["share"], f"memory-bound norm/elementwise work is {_pct(elementwise['share'])} of the "
                                            f"step; {fix}"))
    loss = classes["loss"]["share"]
    if loss >= LOSS_SHARE:
        if settings["fused_loss"]:
            fix = "train.fused_loss is on; " + ("train.compile=true compiles its per-chunk kernel" if not settings["compile"]
                                               else "what is left is the softmax over model.vocab_size")
        else:
            fix = "train.fused_loss=true computes it in chunks fused with the output layer"
        found.append((loss, f"loss is {_pct(loss)} of the step; {fix}"))
    optimizer = classes["optimizer"]["share"]
    if optimizer >= OPTIMIZER_SHARE:
        if gpu and not settings["optim_fused"] and not settings["optim_compile"]:
            fix = "optim.fused=true"
        elif not settings["optim_compile"]:
            fix = "optim.compile=true clips inside one compiled AdamW step (no pass of its own over the gradients)"
        else:
            fix = "more tokens per step (train.global_batch_size) amortise it"
        found.append((optimizer, f"optimizer is {_pct(optimizer)} of the step; {fix}"))
    found.sort(key=lambda item: -item[0])
    return [line for _, line in found] or ["no classic signature found: the step is dominated by work near its roofs"]


def get_straggler_line(ranks: list[dict]) -> str | None:
    if len(ranks) < 2:
        return None
    slow = max(ranks, key=lambda r: r["step_ms"])
    fast = min(ranks, key=lambda r: r["step_ms"])
    busiest = max(ranks, key=lambda r: r["busy_ms"])
    return (f"straggler: slowest rank {slow['rank']} at {slow['step_ms']:.4g} ms/step, fastest rank {fast['rank']} at "
            f"{fast['step_ms']:.4g} ms/step (+{100 * (slow['step_ms'] / fast['step_ms'] - 1):.1f}%); most device-busy: "
            f"rank {busiest['rank']} ({busiest['busy_ms']:.4g} ms), the one the collectives wait for")


def build_report(analysis: dict, *, roofs: Roofs, settings: dict, measured_step_ms: float, step_range: tuple[int, int],
                 model_flops_per_step: float, ranks: list[dict]) -> dict:
    counted = analysis["flops_per_step"]["matmul_attention"]
    return {
        **settings,
        "steps": f"{step_range[0]}-{step_range[1]}",
        "measured_step_ms": measured_step_ms,
        "sum_ms": analysis["sum_ms"],
        "sum_vs_measured": analysis["sum_ms"] / measured_step_ms - 1,
        "roofs": {"device": roofs.device, "peak_tflops": roofs.peak_tflops, "bandwidth_tbps": roofs.bandwidth_tbps,
                  "ridge_flop_per_byte": {d: roofs.ridge(d) for d in roofs.peak_tflops}, "source": roofs.source},
        "model_flops_per_step": model_flops_per_step,
        "counted_vs_model_flops": counted / model_flops_per_step - 1 if model_flops_per_step else None,
        "model_tflops": model_flops_per_step / measured_step_ms / 1e9 if measured_step_ms else None,
        "analysis": analysis,
        "diagnosis": diagnose(analysis, settings),
        "ranks": ranks,
        "straggler": get_straggler_line(ranks),
    }


def format_table(report: dict) -> list[str]:
    """The per-class table (markdown, also readable on a console)."""
    a = report["analysis"]
    header = ["class", "ms/step", "share", "kernels/step", "GFLOP/step", "GB/step", "FLOP/B", "TFLOP/s", "TB/s",
              "roof TFLOP/s", "% of roof", "bound"]
    rows = []
    for name in sorted(CLASSES, key=lambda c: -a["classes"][c]["time_ms"]):
        r = a["classes"][name]
        if not r["time_ms"] and not r["gflop"]:
            continue
        percent_of_roof = None if r["roof_fraction"] is None else round(100 * r["roof_fraction"])
        rows.append([name, r["time_ms"], _pct(r["share"]), round(r["kernels_per_step"]), r["gflop"], r["gbyte"],
                     r["intensity"], r["tflops"], r["tbps"], r["roof_tflops"], percent_of_roof, r["bound"]])
    blank = [""] * (len(header) - 3)
    for key, label in (("data_loading", "data loading"), ("host_sync", "host sync"), ("host_other", "host overhead")):
        rows.append([f"idle: {label}", a["idle"][key]["time_ms"], _pct(a["idle"][key]["share"]), *blank])
    rows.append(["**sum**", report["sum_ms"], _pct(report["sum_ms"] / a["window_ms"]), *blank])
    return markdown_table(header, rows).splitlines()


def format_top_kernels(report: dict) -> list[str]:
    """The heaviest kernels of each class that takes time, heaviest class first."""
    a = report["analysis"]
    rows = [[name, kernel["name"], kernel["time_ms"], round(kernel["calls_per_step"], 1), _pct(kernel["class_share"])]
            for name in sorted(a["top_kernels"], key=lambda c: -a["classes"][c]["time_ms"])
            for kernel in a["top_kernels"][name]]
    return markdown_table(["class", "kernel", "ms/step", "calls/step", "share of class"], rows).splitlines()


def format_summary(report: dict) -> list[str]:
    a, roofs = report["analysis"], report["roofs"]
    peaks = ", ".join(f"{d} {v:.4g} TFLOP/s (ridge {roofs['ridge_flop_per_byte'][d]:.3g} FLOP/B)"
                      for d, v in roofs["peak_tflops"].items())
    counted = a["flops_per_step"]["matmul_attention"]
    lines = [f"steps {report['steps']} on {roofs['device']} ({a['mode']}, {report['world_size']} process(es), "
             f"{report['precision']}, compile {'on' if report['compile'] else 'off'})",
             f"measured step time {report['measured_step_ms']:.4g} ms (wall clock over the window); classes + idle sum to "
             f"{report['sum_ms']:.4g} ms ({100 * report['sum_vs_measured']:+.1f}%)",
             f"roofs ({roofs['source']}): {peaks}; copy bandwidth {roofs['bandwidth_tbps']:.4g} TB/s",
             f"matmul + attention FLOPs {counted / 1e9:.4g} GFLOP/step counted from shapes (attention backward with its "
             f"score recompute) vs the model's {report['model_flops_per_step'] / 1e9:.4g} (6N + 12 L d seq, "
             f"models.flops_per_token, this rank's share)"
             + (f": {100 * report['counted_vs_model_flops']:+.1f}%" if report["counted_vs_model_flops"] is not None else "")
             + (f"; model throughput {report['model_tflops']:.4g} TFLOP/s" if report["model_tflops"] else "")]
    estimate = a.get("optimizer_estimate")
    if estimate:
        parts = ", ".join(f"{part} {e['gbyte']:.3g} GB" for part, e in estimate.items() if e["gbyte"])
        lines.append(f"optimizer FLOPs and bytes estimated from the parameters it steps, not the trace: {parts} per step")
    if report["straggler"]:
        lines.append(report["straggler"])
    return lines


def get_plot_points(report: dict) -> dict[str, dict]:
    """The classes placed on the roofline plot: FLOPs and bytes counted, against an HBM roof (not
    communication), and not so far below it that their work is unseen."""
    return {name: c for name, c in report["analysis"]["classes"].items()
            if c["intensity"] and c["tflops"] and (c["roof_fraction"] or 0) >= PLOTTED_ROOF_FRACTION}


def plot_roofline(path: Path, report: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    roofs, bandwidth = report["roofs"], report["roofs"]["bandwidth_tbps"]
    points = get_plot_points(report)
    lowest = min([c["intensity"] for c in points.values()] + [0.1])
    highest = max([c["intensity"] for c in points.values()] + [10 * max(roofs["ridge_flop_per_byte"].values())])
    x = [lowest / 3 * (highest * 3 / (lowest / 3)) ** (i / 200) for i in range(201)]
    figure = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    roof_styles = ["-", "--", "-.", ":"]  # roofs in black, classes in colour
    for style, (dtype, peak) in zip(roof_styles, sorted(roofs["peak_tflops"].items(), key=lambda item: -item[1])):
        ax.plot(x, [min(peak, xi * bandwidth) for xi in x], "k" + style, linewidth=1.2,
                label=f"{dtype} roof {peak:.4g} TFLOP/s")
        ridge = roofs["ridge_flop_per_byte"][dtype]
        ax.plot([ridge], [peak], "k|", markersize=14)
        ax.annotate(f"ridge {ridge:.3g}", (ridge, peak), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot(x, [xi * bandwidth for xi in x], color="0.6", linewidth=0.8, label=f"bandwidth {bandwidth:.3g} TB/s")
    for name, c in sorted(points.items(), key=lambda item: -item[1]["share"]):  # classes cluster: named in the legend
        ax.scatter([c["intensity"]], [c["tflops"]], s=30 + 1500 * c["share"], alpha=0.6, marker="o",
                   label=f"{name}: {_pct(c['share'])} of the step, {_pct(c['roof_fraction'] or 0)} of roof")
    top = max(roofs["peak_tflops"].values())
    ax.set_ylim(min([c["tflops"] for c in points.values()] + [top]) / 10, top * 3)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"roofline, steps {report['steps']}: {roofs['device']}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", markerscale=0.4)
    ax.grid(True, which="both", linewidth=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_report(out_dir: Path, report: dict) -> list[str]:
    """roofline.md, roofline.json and roofline.png in `out_dir`; returns the console lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, table, top_kernels = format_summary(report), format_table(report), format_top_kernels(report)
    diagnosis = [f"- {line}" for line in report["diagnosis"]]
    ranks = []
    if len(report["ranks"]) > 1:
        rank_table = markdown_table(["rank", "step ms", "busy ms", "idle ms", "exposed communication ms"],
                                    [[r["rank"], r["step_ms"], r["busy_ms"], r["idle_ms"], r["exposed_comm_ms"]]
                                     for r in report["ranks"]])
        ranks = ["## Ranks", "", rank_table, ""]
    md = ["# Roofline report", "", *[f"{line}  " for line in summary], "", *table, "", "## Diagnosis", "", *diagnosis, "",
          "## Top kernels", "", *top_kernels, "", *ranks, "Classes: trainer/trace_analysis.py; FLOP and byte estimates: trainer/kernel_costs.py; diagnosis rules: trainer/roofline.py.", ""]
    (out_dir / "roofline.md").write_text("\n".join(md))
    (out_dir / "roofline.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_roofline(out_dir / "roofline.png", report)
    return ["roofline report:", *summary, *table, "diagnosis:", *diagnosis, "top kernels:", *top_kernels, f"written to {out_dir}/roofline.{{md,json,png}}"]


def get_overrides(argv: list[str]) -> list[str]:
    """`argv` with the report on and, unless given: train.steps just past the profiling window, a run dir of its
    own beside the recipe's (a profiling run must neither resume nor overwrite a training run's logs), and no
    checkpoints."""
    overrides = [*argv, "profile.roofline=true"]
    given = lambda key: any(item.startswith(f"{key}=") for item in argv)  # noqa: E731
    try:  # the window first, with room for it: the recipe's own steps may be fewer
        cfg = load_config([*overrides, f"train.steps={2**31 - 1}"])
    except ConfigError:
        return overrides  # the trainer's CLI reports it
    if not given("train.steps"):
        overrides.append(f"train.steps={cfg.profile.start_step + cfg.profile.steps + 1}")
    if not given("run.dir"):
        overrides.append(f"run.dir={cfg.run.dir.rstrip('/')}_roofline")
    if not given("checkpoint.enabled"):
        overrides.append("checkpoint.enabled=false")
    return overrides


def main(argv: list[str]) -> int:
    """`python -m trainer.roofline recipe=NAME [key=value ...]`: the trainer's CLI with the report on."""
    from trainer.__main__ import main as train_main

    return train_main(get_overrides(argv))


if __name__ == "__main__":
    # The trainer's own entry point, exit handling under torchrun included.
    sys.argv[1:] = get_overrides(sys.argv[1:])
    runpy.run_module("trainer", run_name="__main__")
