"""The machine's roofs, measured on the machine: matmul peak per dtype and copy bandwidth, cached per device.

A short calibration (a large square matmul in fp32 and bf16, fp8 through torch._scaled_mm where the
GPU has it, and a large tensor copy for bandwidth) gives the roofs the roofline report divides by.
The results are cached in a JSON file keyed by device name, so a device is calibrated once.
Must not hold trace analysis or reporting (trainer/roofline.py).
"""
from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Square matmul sizes, the best of them kept: large enough to reach the peak, small enough to take well
# under a second. On CPU a smaller one can run faster (it stays in cache), so it is tried too.
MATMUL_SIZES = {"cuda": (8192,), "cpu": (512, 1024)}
# Bytes of the tensor copied for the bandwidth roof: far beyond the caches (H200 L2 is 50 MB).
COPY_BYTES = {"cuda": 2**30, "cpu": 2**26}
REPEATS = {"cuda": 10, "cpu": 5}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Roofs:
    """Peak matmul TFLOP/s per dtype name ("fp32", "bf16", "fp8") and copy bandwidth in TB/s (1e12 B/s)."""

    device: str
    peak_tflops: dict[str, float] = field(default_factory=dict)
    bandwidth_tbps: float = 0.0
    source: str = "measured"  # measured | cache <path> | given

    def peak(self, dtype: str) -> float:
        """The roof of `dtype`, or the nearest measured one (fp8 falls back to bf16, bf16 to fp32)."""
        for name in (dtype, "bf16", "fp32", *self.peak_tflops):
            if name in self.peak_tflops:
                return self.peak_tflops[name]
        raise ValueError(f"no compute roof measured for {self.device}")

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) where the bandwidth roof meets the compute roof."""
        return self.peak(dtype) / self.bandwidth_tbps


def get_device_name(device: torch.device) -> str:
    """The roofs cache key: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # Throughput scales with the intra-op threads the run uses, so they are part of the key.
    return f"{model} ({torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` timed calls after two warm-up calls: a roof is the best the machine does."""
    for _ in range(2):
        fn()
    _synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best


def _supports_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@torch.no_grad()
def measure_roofs(device: torch.device) -> Roofs:
    kind = "cuda" if device.type == "cuda" else "cpu"
    repeats = REPEATS[kind]
    roofs = Roofs(device=get_device_name(device))
    for name, dtype in DTYPES.items():
        for n in MATMUL_SIZES[kind]:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            tflops = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), device, repeats) / 1e12
            roofs.peak_tflops[name] = max(tflops, roofs.peak_tflops.get(name, 0.0))
            del a, b
    n = MATMUL_SIZES[kind][-1]
    flops = 2 * n**3
    if _supports_fp8(device):
        try:
            a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # _scaled_mm wants it column-major
            one = torch.ones((), device=device)
            fp8 = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,  # noqa: E731
                                           use_fast_accum=True)
            roofs.peak_tflops["fp8"] = flops / _best_seconds(fp8, device, repeats) / 1e12
            del a, b
        except (RuntimeError, TypeError) as exc:  # an older build or driver without fp8 GEMMs: no fp8 roof
            print(f"roofline: no fp8 roof ({' '.join(str(exc).split())[:200]})", flush=True)
    source = torch.empty(COPY_BYTES[kind] // 4, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), device, repeats)
    roofs.bandwidth_tbps = 2 * source.numel() * 4 / seconds / 1e12  # read once, written once
    return roofs


def get_roofs(device: torch.device, cache_path: Path, *, log=print) -> Roofs:
    """The cached roofs of this device, or a fresh calibration written to the cache."""
    name = get_device_name(device)
    cache = {}
    if cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            log(f"roofline: {cache_path} is unreadable; recalibrating")
    entry = cache.get(name)
    if entry and entry.get("peak_tflops") and entry.get("bandwidth_tbps"):
        return Roofs(device=name, peak_tflops=entry["peak_tflops"], bandwidth_tbps=entry["bandwidth_tbps"],
                     source=f"cache {cache_path}")
    log(f"roofline: calibrating the roofs of {name} (once; cached in {cache_path})")
    roofs = measure_roofs(device)
    cache[name] = {**{k: v for k, v in asdict(roofs).items() if k in ("peak_tflops", "bandwidth_tbps")},
                   "date": datetime.date.today().isoformat(), "torch": torch.__version__}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(cache, indent=1) + "\n")
        partial.replace(cache_path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as exc:
        log(f"roofline: could not write {cache_path} ({exc.strerror}); the roofs stay uncached")
    return roofs
