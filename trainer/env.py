"""The process's place in the job: rank, world size, device, process group, and the device's peak.

The only module that reads torchrun's environment variables (RANK, LOCAL_RANK, WORLD_SIZE, and after a restart
TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_USE_AGENT_STORE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
Must not hold mesh construction (parallel/mesh.py) or anything about the model.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Dense bf16 peak TFLOP/s by device name (vendor datasheets, dense, no sparsity). Longest key first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "MI300X": 1307.0,
}


@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    restart_count: int = 0  # torchrun's attempt number: 0, then 1.. after each --max-restarts restart

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def get_env(device_choice: str = "auto") -> Env:
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Env(rank, local_rank, world_size, device, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def init_process_group(env: Env, backend: str = "auto", timeout_s: float = 600.0) -> None:
    """Start the default process group when launched by torchrun with more than one process."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if env.device.type == "cuda" else "gloo"
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    timeout = timedelta(seconds=timeout_s)
    store = _restart_store(env, timeout)
    dist.init_process_group(backend=backend, timeout=timeout, device_id=env.device if backend == "nccl" else None,
                            **({"store": store, "rank": env.rank, "world_size": env.world_size} if store else {}))


def _restart_store(env: Env, timeout: timedelta) -> dist.Store | None:
    """After a torchrun restart, the agent's store under a key prefix of this attempt; else None (env://).

    torchrun hands a restarted worker group the first attempt's TCPStore, keys included, so a new process group
    reads the dead workers' addresses and fails to connect (pytorch/pytorch#167288). On one node every worker
    shares the agent's restart count, so a prefix per attempt keeps attempts apart. Agents on several nodes may
    count restarts differently: there launch/train.sh sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a new store per
    rendezvous round) instead.
    """
    if not env.restart_count or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)) != env.world_size:
        if env.rank == 0:
            print("warning: restarted by torchrun on several nodes with its shared rendezvous store; without "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/train.sh sets it) the new process group may read the "
                  "failed attempt's addresses", flush=True)
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"ridgeline/attempt_{env.restart_count}", base)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU, unlisted GPU): MFU is then not shown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def get_memory_gb(device: torch.device) -> float:
    """Peak reserved device memory (CUDA) or peak resident set size (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def configure_cuda_allocator(env: Env) -> None:
    """Expandable segments: the caching allocator grows segments in place instead of stranding freed
    blocks, so reserved memory stays close to what is allocated. A user's PYTORCH_CUDA_ALLOC_CONF wins."""
    if env.device.type == "cuda" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


LINE_GRACE_S = 5.0


def report_error(message: str, code: int) -> int:
    """One `error:` line from rank 0 (every rank finds the same error); returns `code` for the exit."""
    if get_env().is_main:
        print(f"error: {message}", file=sys.stderr)
    else:
        # torchrun stops all workers when the first one exits: give rank 0 the time to print the line.
        time.sleep(LINE_GRACE_S)
    return code
