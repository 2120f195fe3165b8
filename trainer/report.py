"""Reports: `python -m trainer.report PATH [out=DIR]` turns a run dir or a sweep dir into PNGs and markdown.

A run dir (metrics.jsonl): train and val loss curves, tokens/s over steps, and one layer x step heatmap per
statistic when records carry "layer_stats" ({"step": S, "layer_stats": {"grad_norm": [one per block], ...}}).
A sweep dir (results.json, from trainer/sweep.py): throughput per layout, predicted vs measured memory and
step time (points with the planner's figures), and the loss curves of every point that ran.
Writes DIR/report.md (tables + image links) beside the PNGs; DIR defaults to PATH/report.
Must not hold measurement or training: it only reads what runs and sweeps wrote.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from matplotlib.colors import LogNorm
from matplotlib.figure import Figure  # Figure + savefig renders with Agg; no pyplot, no display needed
from matplotlib.ticker import MaxNLocator

from trainer.config import ConfigError, check_writable, print_help

FIGSIZE = (7.0, 4.0)
DPI = 110


class ReportError(ValueError):
    """PATH is neither a run dir nor a sweep dir, or holds nothing to draw: one line, exit 2."""


def read_jsonl(path: Path) -> list[dict]:
    """One record a line. A run killed mid-write leaves a torn last line: skipped, with one line said."""
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == lines[-1][0]:
                print(f"report: {path}: skipped its torn last line {number} (a run killed mid-write?)")
                break
            raise ReportError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def read_results(path: Path) -> dict:
    """A sweep's points from its results.json, or one line on what is wrong with the file."""
    try:
        results = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    points = results.get("points") if isinstance(results, dict) else None
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ReportError(f"{path}: not a sweep's results (needs a 'points' list of objects)")
    return results


def make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"out={str(out)!r}: cannot create the folder ({exc.strerror or exc})") from None


def find_run_dir(sweep_dir: Path, run_dir: str) -> Path:
    """A point's run dir: the sweep puts each inside its own dir, so its name there finds it from any cwd, in
    results written with relative paths too, and after the sweep dir moved."""
    return sweep_dir / Path(run_dir).name


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path.name


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Run dirs.


def plot_loss(records: list[dict], path: Path, title: str) -> str | None:
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", marker="." if len(train) < 50 else None)
    if val:
        ax.plot(*zip(*val), label="val", marker="o")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_throughput(records: list[dict], path: Path, title: str) -> str | None:
    points = [(r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r]
    if not points:
        return None
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
    ax.set(xlabel="step", ylabel="tokens/s (all processes)", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_layer_heatmaps(records: list[dict], out: Path) -> list[str]:
    """One layer x step heatmap per statistic; log colour scale when every value is positive."""
    stats_records = [r for r in records if isinstance(r.get("layer_stats"), dict)]
    names = []
    for stat in sorted({k for r in stats_records for k in r["layer_stats"]}):
        rows = [(r["step"], r["layer_stats"][stat]) for r in stats_records if stat in r["layer_stats"]]
        num_layers = max(len(values) for _, values in rows)
        if not num_layers:
            continue
        steps = [step for step, _ in rows]
        grid = [[math.nan] * len(rows) for _ in range(num_layers)]
        for column, (_, values) in enumerate(rows):
            for layer, value in enumerate(values):
                grid[layer][column] = float(value) if value is not None else math.nan
        finite = [v for row in grid for v in row if math.isfinite(v)]
        if not finite:
            continue
        fig = Figure(figsize=FIGSIZE)
        ax = fig.add_subplot()
        norm = LogNorm(min(finite), max(finite)) if min(finite) > 0 and max(finite) > min(finite) else None
        image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", norm=norm,
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, num_layers - 0.5))
        fig.colorbar(image, ax=ax, label=stat + (" (log scale)" if norm else ""))
        ax.set(xlabel="step", ylabel="block", title=f"{stat} per block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        names.append(_save(fig, out / f"layer_{stat}.png"))
    return names


def report_run(run_dir: Path, out: Path) -> Path:
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    if not train and not any("val_loss" in r for r in records):
        raise ReportError(f"{run_dir / 'metrics.jsonl'}: no loss records to draw")
    make_out(out)
    images = [plot_loss(records, out / "loss.png", f"loss: {run_dir.name}"),
              plot_throughput(records, out / "throughput.png", f"tokens/s: {run_dir.name}"),
              *plot_layer_heatmaps(records, out)]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in train if "tokens_per_s" in r)
    last = train[-1] if train else {}
    summary = [["steps logged", len(train)], ["last step", last.get("step")], ["final train loss", last.get("loss")],
               ["final val loss", val[-1] if val else None], ["best val loss", min(val) if val else None],
               ["median tokens/s", speeds[len(speeds) // 2] if speeds else None], ["last MFU", last.get("mfu")],
               ["peak memory (GiB)", max((r.get("mem_gb") or 0 for r in train), default=None)]]
    parts = [f"# Run report: {run_dir}", "", markdown_table(["metric", "value"], summary)]
    bench_file = run_dir / "bench.jsonl"
    if bench_file.is_file():
        keys = ["date", "device", "world_size", "steps", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "final_loss"]
        parts += ["", "## Bench records", "", markdown_table(keys, [[b.get(k) for k in keys] for b in read_jsonl(bench_file)])]
    parts += [""] + [f"![{name}]({name})" for name in images if name]
    report = out / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report


# ---------------------------------------------------------------------------------------------
# Sweep dirs.


def plot_sweep_throughput(points: list[dict], path: Path) -> str | None:
    ok = [p for p in points if p.get("status") == "ok" and p.get("tokens_per_s")]
    if not ok:
        return None
    fig = Figure(figsize=(max(FIGSIZE[0], 1.0 + 0.8 * len(ok)), FIGSIZE[1]))
    ax = fig.add_subplot()
    labels = [f"{p['layout']}\n({p.get('nproc', '?')} proc)" for p in ok]
    bars = ax.bar(range(len(ok)), [p["tokens_per_s"] for p in ok], label="measured")
    predicted = [(i, p["pred_tokens_per_s"]) for i, p in enumerate(ok) if p.get("pred_tokens_per_s")]
    if predicted:
        ax.scatter(*zip(*predicted), color="black", marker="_", s=400, zorder=3, label="predicted")
        ax.legend()
    ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
    ax.set_xticks(range(len(ok)), labels, fontsize=8)
    ax.set(ylabel="tokens/s (all processes)", title="throughput per layout")
    return _save(fig, path)


def plot_predicted_vs_measured(points: list[dict], predicted_key: str, measured_key: str, path: Path,
                               label: str) -> str | None:
    pairs = [(p[predicted_key], p[measured_key], p["layout"]) for p in points
             if p.get("status") == "ok" and p.get(predicted_key) is not None and p.get(measured_key) is not None]
    if not pairs:
        return None
    fig = Figure(figsize=(5.0, 4.5))
    ax = fig.add_subplot()
    xs, ys, names = zip(*pairs)
    ax.scatter(xs, ys)
    for x, y, name in pairs:
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    high = max(max(xs), max(ys)) * 1.1
    ax.plot([0, high], [0, high], linestyle="--", color="gray", label="predicted = measured")
    ax.set(xlim=(0, high), ylim=(0, high), xlabel=f"predicted {label}", ylabel=f"measured {label}",
           title=f"{label}: predicted vs measured")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep_losses(points: list[dict], sweep_dir: Path, path: Path) -> str | None:
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    drawn = 0
    for p in points:
        metrics = find_run_dir(sweep_dir, p.get("run_dir") or "") / "metrics.jsonl"
        if p.get("status") != "ok" or not metrics.is_file():
            continue
        try:
            records = read_jsonl(metrics)
        except ReportError as exc:  # one broken point must not cost the sweep its report
            print(f"report: no loss curve for {p.get('layout')}: {exc}")
            continue
        curve = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
        if curve:
            ax.plot(*zip(*curve), marker=".", label=p["layout"])
            drawn += 1
    if not drawn:
        return None
    ax.set(xlabel="step", ylabel="train loss", title="loss per layout")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def report_sweep(sweep_dir: Path, out: Path) -> Path:
    results = read_results(sweep_dir / "results.json")
    points = results["points"]
    if not points:
        raise ReportError(f"{sweep_dir / 'results.json'}: no points")
    make_out(out)
    images = [plot_sweep_throughput(points, out / "sweep_throughput.png"),
              plot_predicted_vs_measured(points, "pred_mem_gb", "peak_mem_gb", out / "sweep_memory.png", "peak memory (GiB)"),
              plot_predicted_vs_measured(points, "pred_step_s", "step_s", out / "sweep_step_time.png", "step time (s)"),
              plot_sweep_losses(points, sweep_dir, out / "sweep_loss.png")]
    header = ["layout", "processes", "status", "tokens/s", "MFU", "peak GiB", "loss", "step s",
              "pred tokens/s", "pred step s", "pred GiB", "error"]
    keys = ["layout", "nproc", "status", "tokens_per_s", "mfu", "peak_mem_gb", "final_loss", "step_s",
            "pred_tokens_per_s", "pred_step_s", "pred_mem_gb", "error"]
    parts = [f"# Sweep report: {sweep_dir}", "",
             f"recipe `{results.get('recipe')}`, {results.get('steps')} steps, measured after step {results.get('warmup')}", "",
             markdown_table(header, [[p.get(k) for k in keys] for p in points])]
    if not any(p.get("pred_step_s") is not None for p in points):
        parts += ["", "No planner predictions in this sweep: no predicted-vs-measured plots."]
    parts += [""] + [f"![{name}]({name})" for name in images if name]
    report = out / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report


def report(path: Path, out: Path | None = None) -> Path:
    out = out or path / "report"
    if (path / "results.json").is_file():
        return report_sweep(path, out)
    if (path / "metrics.jsonl").is_file():
        return report_run(path, out)
    raise ReportError(f"{path}: neither a run dir (metrics.jsonl) nor a sweep dir (results.json)")


def main(argv: list[str]) -> int:
    if print_help(argv, __doc__):
        return 0
    paths = [a for a in argv if not a.startswith("out=")]
    outs = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    try:
        if len(paths) != 1:
            raise ReportError(f"{' '.join(paths) or 'PATH'}: give exactly one run or sweep dir "
                              "(python -m trainer.report PATH [out=DIR])")
        if len(outs) > 1:
            raise ReportError(f"out={outs[-1]!r}: given {len(outs)} times")
        written = report(Path(paths[0]), check_writable("out", outs[0], folder=True) if outs else None)
    except (ReportError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # past the checks: a full disk, an unreadable file, a folder gone read-only
        print(f"error: {exc.filename or paths[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    images = sorted(p.name for p in written.parent.glob("*.png"))
    print(f"report: {written} ({', '.join(images) or 'no images'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
