"""Trace analysis for the roofline report: a torch.profiler chrome trace of the profiling window in,
per-class time, FLOPs, bytes and roof fractions and the idle split out.

trainer/profiling.py records the trace (record_shapes on); `analyze_trace` reads it:

- Device timeline. On GPU: the kernels, memcpys and memsets (ProfilerActivity.CUDA). On CPU: the
  aten ops, each owning its self time (its span minus its aten children), so the innermost op
  doing the work is the "kernel". Where kernels overlap (a collective under compute), the instant
  goes to compute first, then copies, then communication: communication time is what is exposed.
  Idle = the window's time no kernel covers.
- Classes, first rule that matches, on the kernel's name and then on its context (the op that
  launched it and that op's ancestors, record_function ranges included), case-insensitive:
  communication (nccl, gloo, c10d::, all_reduce ... in the name); memory copies (GPU Memcpy and
  Memset); attention (flash, fmha, cudnn, efficient_attention, sdpa, scaled_dot_product in the name
  or context); matmul (gemm, cutlass, xmma, nvjet, cublas, splitKreduce, triton_tem templates, or
  aten::mm/addmm/bmm/baddbmm/_scaled_mm/matmul/linear in the name or context); loss
  (cross_entropy, log_softmax, nll_loss, logsumexp, LinearCrossEntropy, or the "loss" range);
  memory copies (under FSDP:: ranges: its copy-in/out); optimizer (multi_tensor_apply, fused_adam,
  _foreach_ (gradient clipping included), or under "optimizer.step"/"Optimizer.step#"); on CPU
  memory copies (copy_, clone, fill_, zero_); other (embedding, index, sort, scatter/gather, views
  and allocations); norm/elementwise (triton_ fused kernels, elementwise, vectorized, reduce, norm,
  softmax ... and, on CPU, any remaining aten op); else other. Triton fused kernels are named after
  the ops they fuse, so one with log_softmax in its name lands in loss and the rest of Triton in
  norm/elementwise: a heuristic. A kernel of a backward op sees the autograd node in its context
  (e.g. LogSoftmaxBackward0), not the forward's ranges.
- FLOPs and bytes: each op is counted once, with the class of the kernels it accounts for: the
  outermost op with a FLOP formula, else the op that launched the kernels (GPU) or the innermost op
  (CPU); its cost comes from its recorded shapes (trainer/kernel_costs.py). Where the caller passes
  `OptimizerWork` (trainer/profiling.py does), the optimizer class's FLOPs and bytes are that
  estimate from the parameters instead.
- Roofs (trainer/roofs.py): a class's compute peak is that of its FLOP mix (fp8, bf16, fp32 matmul
  peaks, each dtype's FLOPs at its own peak), its roof min(peak, intensity x bandwidth), its bound
  "compute" past the ridge. They are HBM/DRAM roofs: on CPU a small working set runs from cache and
  can beat them.
- Top kernels: per class, the kernels (GPU) or aten ops (CPU) by name that own the most time, so a
  class far from its roof points at the code to fuse or change.
- Idle split: time overlapping the "next_batch" range is data loading; on GPU a gap that begins as
  a host sync returns (cudaStreamSynchronize, .item()) is a host sync; the rest is host overhead.
  On CPU there is no queue to drain, so host syncs are found by count: .item() calls inside
  "train_step" (the forward and backward).

Must not hold the per-op FLOP and byte formulas or the optimizer's estimate (trainer/kernel_costs.py),
the profiling window (trainer/profiling.py), the calibration (trainer/roofs.py) or the report and its
diagnosis (trainer/roofline.py).
"""
from __future__ import annotations

import bisect
import functools
import gzip
import heapq
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from trainer.kernel_costs import CPU_COPIES, VIEW_OPS, OptimizerWork, get_bytes, get_dtype, get_flops, has_formula
from trainer.roofs import Roofs

TOP_KERNELS = 5
KERNEL_NAME_CHARS = 120  # templated CUDA kernel names run to thousands of characters
CLASSES = ("matmul", "attention", "norm/elementwise", "loss", "optimizer", "communication", "memory copies", "other")
# record_function ranges: the train loop's (trainer/train.py) and the profiling window's (trainer/profiling.py).
DATA_RANGE, STEP_RANGE, FORWARD_BACKWARD_RANGE, LOSS_RANGE = "next_batch", "ProfilerStep#", "train_step", "loss"

SUBCLASS_DISPATCH = "PythonSubclass"  # the profiler's event between a tensor subclass's op and the ops it runs
COMMUNICATION = ("nccl", "gloo", "c10d::", "record_param_comms", "all_reduce", "allreduce", "all_gather",
                 "allgather", "reduce_scatter", "reducescatter", "all_to_all", "alltoall")
ATTENTION = ("flash", "fmha", "cudnn", "efficient_attention", "sdpa", "scaled_dot_product")
MATMUL_KERNELS = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitkreduce", "triton_tem")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::matmul", "aten::linear"}
LOSS = ("cross_entropy", "crossentropy", "log_softmax", "nll_loss", "logsumexp")
OPTIMIZER = ("multi_tensor_apply", "fused_adam", "_fused_adam", "_foreach_", "optimizer.step", "optimizer.zero_grad")
OTHER = ("embedding", "index", "sort", "scatter", "gather", "nonzero", "aten::item", "_local_scalar_dense")
ELEMENTWISE = ("triton", "elementwise", "vectorized", "reduce", "norm", "rms", "softmax", "unrolled", "pointwise")
SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaEventSynchronize")
SYNC_GAP_TOLERANCE_US = 5.0


@dataclass
class HostEvent:
    name: str
    cat: str
    tid: object
    start: float
    end: float
    args: dict
    parent: int = -1
    depth: int = 0
    aten_children: int = 0  # children that are aten ops doing work


@dataclass
class Unit:
    """One kernel of the device timeline (a GPU kernel, or a CPU aten op's self time)."""

    name: str
    start: float
    end: float
    cls: str
    priority: tuple
    op: int  # index of the host op that launched it (GPU) or is it (CPU); -1 if unknown


@dataclass
class ClassTotals:
    time_us: float = 0.0
    kernels: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    flops_by_dtype: dict = field(default_factory=lambda: defaultdict(float))


# ---------------------------------------------------------------------------------------------
# Trace reading


def load_trace(path: Path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def build_host_tree(events: list[dict]) -> list[HostEvent]:
    """Host events (ops, ranges, runtime calls) with parents found by nesting on each thread."""
    host = [HostEvent(e["name"], e["cat"], e.get("tid"), float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)),
                      e.get("args", {})) for e in events]
    by_thread = defaultdict(list)
    for index, event in enumerate(host):
        by_thread[event.tid].append(index)
    for indices in by_thread.values():
        indices.sort(key=lambda i: (host[i].start, -(host[i].end - host[i].start)))
        stack: list[int] = []
        for i in indices:
            while stack and host[stack[-1]].end <= host[i].start:
                stack.pop()
            if stack:
                host[i].parent, host[i].depth = stack[-1], len(stack)
                if host[i].name.startswith("aten::") and host[i].name not in VIEW_OPS:
                    host[stack[-1]].aten_children += 1  # views and allocations do not make a parent a composite
            stack.append(i)
    return host


def _matches(text: str, needles) -> bool:
    text = text.lower()
    return any(n in text for n in needles)


@functools.lru_cache(maxsize=None)
def get_marks(name: str) -> frozenset[str]:
    """What an op or range says about the kernels launched under it."""
    marks = set()
    if _matches(name, ATTENTION):
        marks.add("attention")
    if name in MATMUL_OPS:
        marks.add("matmul")
    if _matches(name, LOSS + ("linearcrossentropy",)) or name == LOSS_RANGE:
        marks.add("loss")
    if name.lower().startswith("fsdp::"):
        marks.add("fsdp")
    if _matches(name, OPTIMIZER):
        marks.add("optimizer")
    if name == FORWARD_BACKWARD_RANGE:
        marks.add("train_step")
    if name in SYNCS:
        marks.add("sync")
    return frozenset(marks)


def get_contexts(host: list[HostEvent]) -> list[frozenset[str]]:
    """Each host event's marks together with its ancestors' (parents are shallower, so done first)."""
    contexts: list[frozenset[str]] = [frozenset()] * len(host)
    for i in sorted(range(len(host)), key=lambda i: host[i].depth):
        parent = host[i].parent
        contexts[i] = get_marks(host[i].name) | (contexts[parent] if parent >= 0 else frozenset())
    return contexts


def classify(name: str, context: frozenset[str] = frozenset(), *, device: bool, memcpy: bool = False) -> str:
    """The class of a kernel `name` launched under ops and ranges marked `context` (get_marks); rules in
    the module docstring."""
    if _matches(name, COMMUNICATION):
        return "communication"
    if memcpy:
        return "memory copies"
    if _matches(name, ATTENTION) or "attention" in context:
        return "attention"
    if _matches(name, MATMUL_KERNELS) or name in MATMUL_OPS or "matmul" in context:
        return "matmul"
    if _matches(name, LOSS) or "loss" in context:
        return "loss"
    if "fsdp" in context:  # FSDP's copy-in/out around its collectives
        return "memory copies"
    if _matches(name, OPTIMIZER) or "optimizer" in context:
        return "optimizer"
    if not device and name in CPU_COPIES:
        return "memory copies"
    if _matches(name, OTHER) or name in VIEW_OPS:
        return "other"
    if _matches(name, ELEMENTWISE) or (not device and name.startswith("aten::")):
        return "norm/elementwise"
    return "other"


# ---------------------------------------------------------------------------------------------
# The device timeline


def attribute_time(units: list[Unit], start: float, end: float) -> tuple[list[float], list[tuple[float, float]]]:
    """Each instant of [start, end] goes to the highest-priority unit covering it; returns every
    unit's time and the gaps no unit covers (a sweep over a heap of active units)."""
    order = sorted(range(len(units)), key=lambda i: units[i].start)
    owned = [0.0] * len(units)
    gaps: list[tuple[float, float]] = []
    active: list[tuple] = []
    t, i = start, 0
    while t < end:
        while i < len(order) and units[order[i]].start <= t:
            u = units[order[i]]
            heapq.heappush(active, (tuple(-p for p in u.priority), order[i]))
            i += 1
        while active and units[active[0][1]].end <= t:
            heapq.heappop(active)
        next_start = units[order[i]].start if i < len(order) else end
        if active:
            top = active[0][1]
            stop = min(units[top].end, next_start, end)
            owned[top] += stop - t
        else:
            stop = min(next_start, end)
            if stop > t:
                gaps.append((t, stop))
        t = stop if stop > t else next_start
    return owned, gaps


def _overlap(gap: tuple[float, float], ranges: list[tuple[float, float]], starts: list[float]) -> float:
    total, (g0, g1) = 0.0, gap
    index = max(0, bisect.bisect_right(starts, g0) - 1)
    while index < len(ranges) and ranges[index][0] < g1:
        total += max(0.0, min(g1, ranges[index][1]) - max(g0, ranges[index][0]))
        index += 1
    return total


def _merge(ranges: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(ranges):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _device_units(host: list[HostEvent], contexts: list, device_raw: list[dict]) -> list[Unit]:
    """GPU kernels, memcpys and memsets, each tied to the host op that launched it."""
    launches = {h.args["correlation"]: i for i, h in enumerate(host)
                if h.cat in ("cuda_runtime", "cuda_driver") and "correlation" in h.args}
    by_external_id = {h.args["External id"]: i for i, h in enumerate(host)
                      if h.cat in ("cpu_op", "user_annotation") and "External id" in h.args}
    units = []
    for e in device_raw:
        args = e.get("args", {})
        launch = launches.get(args.get("correlation"), -1)
        op = host[launch].parent if launch >= 0 else by_external_id.get(args.get("External id"), -1)
        cls = classify(e["name"], contexts[op] if op >= 0 else frozenset(), device=True,
                       memcpy=e["cat"] in ("gpu_memcpy", "gpu_memset"))
        # Overlapping kernels: compute owns the instant, then copies, then (exposed) communication.
        rank = 0 if cls == "communication" else 1 if cls == "memory copies" else 2
        start = float(e["ts"])
        units.append(Unit(e["name"], start, start + float(e.get("dur", 0)), cls, (rank,), op))
    return units


def _cpu_units(host: list[HostEvent], contexts: list) -> list[Unit]:
    """Aten ops (and collectives); the deepest op covering an instant owns it: self time."""
    units = []
    for i, h in enumerate(host):
        # gloo's waits ("gloo:recv", "gloo:all_reduce") are annotations, not ops: without them a pipeline's or
        # FSDP's waiting would read as host overhead.
        if (h.cat == "cpu_op" and (h.name.startswith("aten::") or _matches(h.name, COMMUNICATION))
                or h.cat == "user_annotation" and _matches(h.name, COMMUNICATION)):
            cls = classify(h.name, contexts[h.parent] if h.parent >= 0 else frozenset(), device=False)
            units.append(Unit(h.name, h.start, h.end, cls, (0 if cls == "communication" else 1, h.depth), i))
    return units


def _counted_elsewhere(host: list[HostEvent]) -> list[bool]:
    """True where an op's work is counted elsewhere: by an ancestor with a FLOP formula, or, for a tensor
    subclass's op (a DTensor's, with global shapes), by the local op it dispatches to under "PythonSubclass"."""
    above = [False] * len(host)
    for i in sorted(range(len(host)), key=lambda i: host[i].depth):
        parent = host[i].parent
        above[i] = parent >= 0 and host[parent].name != SUBCLASS_DISPATCH and (
            above[parent] or has_formula(host[parent].name))
    wrapping = set()  # the ops above a subclass dispatch see global shapes: not theirs to count
    for h in host:
        parent = h.parent if h.name == SUBCLASS_DISPATCH else -1
        while parent >= 0 and parent not in wrapping:
            wrapping.add(parent)
            parent = host[parent].parent
    for i in wrapping:
        above[i] = True
    return above


def _accounted_ops(host: list[HostEvent], units: list[Unit], *, device: bool) -> dict[int, str]:
    """The ops whose FLOPs and bytes are counted, each once, with the class they count for."""
    formula_above = _counted_elsewhere(host)
    if not device:
        return {u.op: u.cls for u in units if not formula_above[u.op] and host[u.op].name not in VIEW_OPS
                and (has_formula(host[u.op].name) or host[u.op].aten_children == 0)}
    time_by_op: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for u in units:
        op = u.op
        while op >= 0 and formula_above[op]:
            op = host[op].parent
        if op >= 0 and "Input Dims" in host[op].args:
            time_by_op[op][u.cls] += u.end - u.start
    return {op: max(by_class, key=by_class.get) for op, by_class in time_by_op.items()}


def _split_idle(host: list[HostEvent], gaps: list[tuple[float, float]], *, device: bool) -> dict[str, float]:
    data = _merge([(h.start, h.end) for h in host if h.name == DATA_RANGE])
    data_starts = [s for s, _ in data]
    sync_ends = sorted(h.end for h in host if h.name in SYNCS)
    idle = {"data_loading": 0.0, "host_sync": 0.0, "host_other": 0.0}
    for gap in gaps:
        in_data = _overlap(gap, data, data_starts)
        idle["data_loading"] += in_data
        k = bisect.bisect_left(sync_ends, gap[0] - SYNC_GAP_TOLERANCE_US)
        after_sync = device and k < len(sync_ends) and sync_ends[k] <= gap[1]
        idle["host_sync" if after_sync else "host_other"] += (gap[1] - gap[0]) - in_data
    return idle


def _class_row(c: ClassTotals, name: str, *, steps: int, window_us: float, roofs: Roofs | None) -> dict:
    seconds = c.time_us / 1e6
    intensity = c.flops / c.bytes if c.bytes else None
    by_dtype = {d: f / c.flops for d, f in c.flops_by_dtype.items() if f} if c.flops else {}
    row = {"time_ms": c.time_us / steps / 1e3, "share": c.time_us / window_us, "kernels_per_step": c.kernels / steps,
           "gflop": c.flops / steps / 1e9, "gbyte": c.bytes / steps / 1e9, "intensity": intensity,
           "tflops": c.flops / seconds / 1e12 if seconds else None, "tbps": c.bytes / seconds / 1e12 if seconds else None,
           "flops_by_dtype": by_dtype, "peak_tflops": None, "roof_tflops": None, "roof_fraction": None, "bound": None}
    if roofs is None or not seconds or name == "communication":  # collectives move bytes over links, not HBM
        return row
    if intensity:
        # Mixed dtypes (fp8 block linears beside a bf16 output layer): the peak that runs this FLOP mix
        # in the least time, each dtype at its own roof.
        peak = 1 / sum(share / roofs.peak(d) for d, share in by_dtype.items())
        row["peak_tflops"], row["roof_tflops"] = peak, min(peak, intensity * roofs.bandwidth_tbps)
        row["roof_fraction"] = row["tflops"] / row["roof_tflops"]
        row["bound"] = "compute" if intensity >= peak / roofs.bandwidth_tbps else "memory"
    elif c.bytes:  # pure data movement: against the bandwidth roof
        row["roof_fraction"], row["bound"] = row["tbps"] / roofs.bandwidth_tbps, "memory"
    return row


def _top_kernels(by_kernel: dict[tuple[str, str], list[float]], totals: dict[str, ClassTotals],
                 num_steps: int) -> dict[str, list[dict]]:
    """Per class, its TOP_KERNELS names by owned time: ms and calls per step, and their share of the class."""
    top: dict[str, list[dict]] = {}
    for (cls, name), (time_us, calls) in sorted(by_kernel.items(), key=lambda item: -item[1][0]):
        rows = top.setdefault(cls, [])
        if len(rows) < TOP_KERNELS and time_us > 0:
            rows.append({"name": name[:KERNEL_NAME_CHARS], "time_ms": time_us / num_steps / 1e3,
                         "calls_per_step": calls / num_steps, "class_share": time_us / totals[cls].time_us})
    return {cls: rows for cls, rows in top.items() if rows}


def analyze_trace(trace: dict, *, roofs: Roofs | None = None, optimizer_work: OptimizerWork | None = None) -> dict:
    """Per-class time, FLOPs, bytes and roof fractions, and the idle split, of the steps in `trace`
    (its ProfilerStep# ranges; the whole trace when it has none). Times are per step, in ms. With
    `optimizer_work`, the optimizer class's FLOPs and bytes are that estimate, not the trace's."""
    raw = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    device_raw = [e for e in raw if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    host = build_host_tree([e for e in raw if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")])
    contexts = get_contexts(host)
    device = bool(device_raw)
    steps = [h for h in host if h.name.startswith(STEP_RANGE)]
    spans = steps or host
    window = (min(h.start for h in spans), max(h.end for h in spans))
    num_steps, window_us = max(1, len(steps)), window[1] - window[0]

    units = _device_units(host, contexts, device_raw) if device else _cpu_units(host, contexts)
    units = [u for u in units if u.end > window[0] and u.start < window[1]]
    for u in units:
        u.start, u.end = max(u.start, window[0]), min(u.end, window[1])
    owned, gaps = attribute_time(units, *window)
    accounted = _accounted_ops(host, units, device=device)

    totals = {c: ClassTotals() for c in CLASSES}
    by_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])  # (class, name) -> [us, calls]
    for u, t in zip(units, owned):
        totals[u.cls].time_us += t
        by_kernel[u.cls, u.name][0] += t
        by_kernel[u.cls, u.name][1] += 1
    if device:
        kernels = [(u.cls, u.end - u.start) for u in units if not u.name.startswith(("Memcpy", "Memset"))]
    else:  # the ops doing the work, not the composites around them
        kernels = [(cls, host[op].end - host[op].start) for op, cls in accounted.items()]
    for cls, _ in kernels:
        totals[cls].kernels += 1
    for op, cls in accounted.items():
        flops = get_flops(host[op].name, host[op].args)
        totals[cls].flops += flops
        totals[cls].bytes += get_bytes(host[op].name, host[op].args)
        totals[cls].flops_by_dtype[get_dtype(host[op].args)] += flops
    if optimizer_work is not None:
        optimizer = totals["optimizer"]
        optimizer.flops = sum(optimizer_work.flops.values()) * num_steps
        optimizer.bytes = sum(optimizer_work.bytes.values()) * num_steps
        optimizer.flops_by_dtype = defaultdict(float, {d: f * num_steps for d, f in optimizer_work.flops_by_dtype.items()})

    idle = _split_idle(host, gaps, device=device)
    syncs = sum(1 for i, h in enumerate(host) if h.name in SYNCS and window[0] <= h.start < window[1]
                and "train_step" in contexts[i] and not (h.parent >= 0 and "sync" in contexts[h.parent]))
    htod = [u for u in units if "htod" in u.name.lower()]
    per_step = lambda us: us / num_steps / 1e3  # noqa: E731  (us over the window -> ms per step)
    classes = {name: _class_row(c, name, steps=num_steps, window_us=window_us, roofs=roofs) for name, c in totals.items()}
    idle_us = sum(idle.values())
    return {
        "mode": "cuda" if device else "cpu",
        "steps": num_steps,
        "window_ms": per_step(window_us),
        "busy_ms": per_step(sum(owned)),
        "idle_ms": per_step(idle_us),
        # Summed independently of the window: classes from the sweep, idle from its gaps.
        "sum_ms": per_step(sum(c.time_us for c in totals.values()) + idle_us),
        "classes": classes,
        "idle": {k: {"time_ms": per_step(v), "share": v / window_us} for k, v in idle.items()},
        "top_kernels": _top_kernels(by_kernel, totals, num_steps),
        "kernels": {"per_step": len(kernels) / num_steps,
                    "median_us": statistics.median(d for _, d in kernels) if kernels else 0.0},
        "syncs_in_train_step_per_step": syncs / num_steps,
        "htod": {"per_step": len(htod) / num_steps, "time_ms": per_step(sum(u.end - u.start for u in htod)),
                 "pageable": any("pageable" in u.name.lower() for u in htod)},
        "communication": {"total_ms": per_step(sum(u.end - u.start for u in units if u.cls == "communication")),
                          "exposed_ms": classes["communication"]["time_ms"]},
        "flops_per_step": {"matmul_attention": sum(totals[c].flops for c in ("matmul", "attention")) / num_steps,
                           "all": sum(c.flops for c in totals.values()) / num_steps},
        "optimizer_estimate": None if optimizer_work is None else {
            part: {"gflop": optimizer_work.flops[part] / 1e9, "gbyte": optimizer_work.bytes[part] / 1e9}
            for part in optimizer_work.bytes},
    }
