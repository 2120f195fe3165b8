"""The planner's cost model: per-rank peak memory and step time of one layout, from the config alone.

Holds the GPU table, the byte accounting (parameters, gradients and AdamW state per ZeRO stage,
activations per layer by checkpointing mode, the loss) and the time terms (compute, TP, DP and PP
communication, pipeline bubble, optimizer). docs/planner.md derives every term. Pure arithmetic on
the config: must not build models, touch devices or start process groups (parallel/plan.py
enumerates and ranks layouts; this file only prices one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from models import count_params, flops_per_token
from models.loss import CHUNK_ELEMENTS
from parallel.float8 import pays_off
from parallel.pipeline import get_bubble_fraction, get_stage_ids, get_stage_layers
from trainer.env import PEAK_BF16_TFLOPS

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """Datasheet figures (dense, no sparsity) of one accelerator in its usual 8-per-node server."""

    name: str
    bf16_tflops: float
    fp8_tflops: float | None
    fp32_tflops: float  # plain fp32 (the trainer's fp32 runs do not enable TF32)
    hbm_gib: float  # what the CUDA driver reports as total, not the marketing GB
    hbm_tbps: float  # memory bandwidth, TB/s
    intra_gbps: float  # NVLink per GPU, one direction, GB/s
    inter_gbps: float  # network per GPU (one NIC each), one direction, GB/s
    mfu: float  # default share of the bf16 peak on the model's FLOPs while computing (compiled, large micro-batch)
    mem_overhead_gb: float = 0.0  # default: reserved memory the byte accounting misses (fitted, docs/planner.md)
    untracked_gb: float = 1.0  # CUDA context, NCCL buffers: outside the caching allocator, yet they must fit too
    size_half: float = 2**19  # tokens x dim/tp of a micro-batch at which matmuls run at half their saturated rate
    fused_rms_norm: bool = True  # torch.rms_norm is one kernel that saves input and rstd (CUDA); else composite ops


# Sources in docs/planner.md. The H200 here measured ~790 TFLOP/s on a bf16 matmul; the bf16 peaks are
# trainer/env.py's datasheet figures, the ones it divides by for MFU, so calibrated MFUs carry over. Hopper's
# 0.60: the H200 bench_1b trace spends 220 ms computing 1.29e5 GFLOP per step (docs/roofline/h200_bench_1b_bf16.md).
GPUS = {
    "h100": GPU("H100 SXM 80GB", PEAK_BF16_TFLOPS["H100"], 1979.0, 67.0, 79.1, 3.35, 450.0, 50.0, 0.60),
    "h200": GPU("H200 SXM 141GB", PEAK_BF16_TFLOPS["H200"], 1979.0, 67.0, 139.7, 4.8, 450.0, 50.0, 0.60),
    "a100": GPU("A100 SXM 80GB", PEAK_BF16_TFLOPS["A100"], None, 19.5, 79.1, 2.04, 300.0, 25.0, 0.50),
    "b200": GPU("B200 180GB", PEAK_BF16_TFLOPS["B200"], 4500.0, 75.0, 178.4, 8.0, 900.0, 50.0, 0.50),
    # A nominal host for CPU runs (gloo over shared memory): placeholders to calibrate, not measurements.
    # Memory there is the process's peak RSS, which includes the Python and torch libraries.
    "cpu": GPU("CPU (nominal)", 0.2, None, 0.2, 64.0, 0.05, 5.0, 1.25, 0.30, mem_overhead_gb=0.35, untracked_gb=0.0,
               size_half=2**10, fused_rms_norm=False),
}

# Defaults of the calibratable knobs (a calibration dict overrides any of them).
DEFAULT_DP_OVERLAP = 0.8  # share of compute time behind which DP/FSDP collectives can hide
# Reserved over allocated with expandable segments (trainer/env.py), fitted once by least squares to the six
# current-code H200 rows of docs/planner.md: reserved = 1.0066 x modelled bytes - 0.003 GiB.
ALLOCATOR_SLACK = 0.007
COMM_EFFICIENCY = 0.8  # achieved bus bandwidth over link bandwidth (nccl-tests: ~360 of 450 GB/s NVLink)
EAGER_EFFICIENCY = 0.80  # eager over compiled blocks: 54,705 / 68,196 tokens/s, bench_1b on the H200
# fp8 linears' share of fp8 peak relative to bf16's share of bf16 peak: fits the three fp8 rows of docs/planner.md
# (H200, fourth set) within 3 %.
FP8_EFFICIENCY = 0.67
LAUNCH_S = 5e-6  # per-kernel host overhead: the floor of a tiny layer's time
KERNELS_PER_LAYER = {True: 30, False: 90}  # forward + backward kernels of one block, compiled / eager
# Keyed by optim.compile. AdamW reads param, grad, m, v and writes param, m, v (fp32, 28 bytes) after the norm has
# read the gradients (4); fused AdamW's clip also scales them in place (8 more), ClippedAdamW scales on the fly.
# Shares of the HBM rate from the H200 traces of bench_1b (1.38e9 parameters): 16.2 ms (3.4 of 4.8 TB/s) and
# 11.2 ms (3.95).
OPTIMIZER_BYTES = {False: 40, True: 32}
OPTIMIZER_BANDWIDTH_SHARE = {False: 0.7, True: 0.82}


def get_gpu_key(name: str) -> str:
    """The table key of a key or device name ('h100', 'NVIDIA H100 80GB HBM3', 'H200'); KeyError if none."""
    lowered = name.lower()
    if lowered in GPUS:
        return lowered
    for key in GPUS:
        if key != "cpu" and key in lowered:
            return key
    raise KeyError(name)


@dataclass(frozen=True)
class Layout:
    """One way to run the recipe: mesh degrees and the knobs the planner varies."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    zero: int
    pp_schedule: str
    virtual_stages: int
    microbatches: int  # pipeline microbatches per accumulation slice (1 without pp)
    micro_batch_size: int
    ac: str
    sequence_parallel: bool

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp


class ModelShape:
    """What the cost model reads from a config, computed once per plan."""

    def __init__(self, cfg):
        m, t = cfg.model, cfg.train
        self.dim, self.layers, self.heads, self.kv_heads = m.dim, m.num_layers, m.num_heads, m.num_kv_heads
        self.kv_dim, self.ffn, self.vocab = m.num_kv_heads * m.head_dim, m.ffn_dim, m.vocab_size
        self.seq, self.batch = t.seq_len, t.global_batch_size
        self.precision, self.compile = t.precision, t.compile
        self.fused_loss = t.fused_loss
        self.optim_compile = cfg.optim.compile
        self.fp8_output = t.precision == "fp8" and t.fp8_output and pays_off(m.dim, m.vocab_size)
        self.ac_every = t.ac_every
        d, kv, f = self.dim, self.kv_dim, self.ffn
        # (fan_in, fan_out) of each block linear; the float8 ones by parallel/float8.py's rule.
        self.linears = {"wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d), "w1": (d, f), "w3": (d, f),
                        "w2": (f, d)}
        self.fp8_linears = frozenset(name for name, dims in self.linears.items() if pays_off(*dims))
        self.matmul_params = sum(fan_in * fan_out for fan_in, fan_out in self.linears.values())
        self.layer_params = self.matmul_params + 2 * d  # + the two norms
        self.embedding_params = m.vocab_size * d + (m.max_seq_len * d if m.pos_encoding == "learned" else 0)
        self.output_params = 0 if m.tie_embeddings else m.vocab_size * d
        assert self.layers * self.layer_params + d + self.embedding_params + self.output_params == count_params(m)
        self.layer_flops = 6 * self.layer_params + 12 * d * self.seq  # per token, as models.flops_per_token
        self.head_flops = 6 * (d + m.vocab_size * d)  # final norm and output layer
        self.flops_per_token = flops_per_token(m, self.seq)
        assert math.isclose(self.layers * self.layer_flops + self.head_flops, self.flops_per_token)
        self.compute_bytes = 4 if self.precision == "fp32" else 2


def get_in_flight(layout: Layout, rank: int) -> int:
    """Microbatch-chunks whose activations a pp rank holds at once (torch.distributed.pipelining's warm-up)."""
    p, m, v = layout.pp, layout.microbatches, layout.virtual_stages
    if p == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return m * v
    if layout.pp_schedule == "1f1b":
        return min(m, p - rank)
    return min((v - 1) * min(p, m) + 2 * (p - 1 - rank) + 1, m * v)


# ---------------------------------------------------------------------------------------------
# Activations: bytes per token per layer, read off models/llama.py's Block (see docs/planner.md).


@dataclass(frozen=True)
class BlockSetup:
    """How a block runs in one layout: which of its linears are float8."""

    fp8: frozenset[str]


def get_block_setup(shape: ModelShape) -> BlockSetup:
    return BlockSetup(fp8=shape.fp8_linears if shape.precision == "fp8" else frozenset())


def get_layer_activation_bytes(shape: ModelShape, layout: Layout, block: BlockSetup, *, residual_bytes: int,
                               eager: bool, fused_norm: bool) -> float:
    """Saved for backward by one block without checkpointing, per token of a micro-batch, on one tp rank.

    Eager: what autograd saves op by op. Compiled: what inductor's partitioner keeps (read off the forward
    graph's saved outputs on CPU, the H200 peaks agree): the block input but not the mid-block residual,
    which it rebuilds from wo's output; and where a float8 linear casts a tensor in backward anyway, the
    cast kernel recomputes it (w2's input from gate and up) or the 1-byte cast is kept (w1/w3's input).
    """
    d, kv, f, a, r, tp = shape.dim, shape.kv_dim, shape.ffn, shape.compute_bytes, residual_bytes, layout.tp
    seq_split = tp if layout.sequence_parallel else 1
    # SDPA keeps q and k after RoPE, v, out and the logsumexp; GQA runs inside SDPA (enable_gqa), so k and
    # v keep their kv heads.
    attention = (2 * a * d + 2 * a * kv + 4 * shape.heads) / tp
    rstd = 2 * 4 / seq_split
    if eager:
        # RMSNorm: its input per norm; composite, the input and the normalised input upcast to fp32 instead. The
        # q/k/v and gate/up inputs: one each, already in the compute dtype (the residual stream is).
        norms = (2 * r if fused_norm else 2 * 2 * 4) * d / seq_split
        ffn = 4 * a * f / tp  # gate, up, silu(gate), their product
        return norms + 2 * a * d + attention + ffn + rstd
    residual = (r * d + a * d) / seq_split  # block input; wo's output rebuilds the mid-block residual
    qkv_input = (1 if {"wq", "wk", "wv"} <= block.fp8 else a) * d  # under TP the all-gathered input
    w13_input = (1 if {"w1", "w3"} <= block.fp8 else a) * d
    ffn = (2 * a * f + (0 if "w2" in block.fp8 else a * f)) / tp  # gate, up, and w2's input
    return residual + qkv_input + w13_input + attention + ffn + rstd


def get_block_matmuls(shape: ModelShape, layout: Layout) -> list[tuple[float, int]]:
    """(output bytes per token on one tp rank, weight params) of wq, wk, wv, wo, w1, w3, w2: the order the block
    runs them in."""
    d, kv, f, a, tp = shape.dim, shape.kv_dim, shape.ffn, shape.compute_bytes, layout.tp
    seq_split = tp if layout.sequence_parallel else 1
    return [(a * d / tp, d * d), (a * kv / tp, d * kv), (a * kv / tp, d * kv), (a * d / seq_split, d * d),
            (a * f / tp, d * f), (a * f / tp, d * f), (a * d / seq_split, f * d)]


def get_selective_bytes(shape: ModelShape, layout: Layout, *, residual_bytes: int,
                        eager: bool) -> tuple[float, int]:
    """(bytes per token per layer, recomputed matmul params) under parallel/activation_checkpoint.py's
    selective policy: the block input, SDPA's outputs, and the 1st, 3rd, ... matmul outputs (wq, wv, w1, w2;
    wk, wo, w3 are recomputed). Compiled, an output no backward op reads is not kept: w2's only feeds the
    residual add."""
    d, a, tp = shape.dim, shape.compute_bytes, layout.tp
    matmuls = get_block_matmuls(shape, layout)
    kept = [i for i in range(0, len(matmuls), 2) if eager or i < len(matmuls) - 1]
    saved = sum(matmuls[i][0] for i in kept)
    recomputed = sum(params for i, (_, params) in enumerate(matmuls) if i % 2 == 1)
    block_input = residual_bytes * d / (tp if layout.sequence_parallel else 1)
    return block_input + saved + (a * d + 4 * shape.heads) / tp, recomputed


def get_weight_copy_bytes(shape: ModelShape, layout: Layout, block: BlockSetup, *, autocast: bool) -> float:
    """Per layer, held from forward to backward: autocast's compute-dtype weight copies, saved by eager linears
    and kept by inductor's partitioner alike. Float8 linears keep none: torchao saves the fp32 weight and
    casts it again in backward. A checkpointed block recomputes its copies (docs/planner.md)."""
    if not autocast:
        return 0.0
    copied = sum(n for name, n in get_linear_params(shape).items() if name not in block.fp8)
    return shape.compute_bytes * copied / layout.tp


def get_linear_params(shape: ModelShape) -> dict[str, int]:
    return {name: fan_in * fan_out for name, (fan_in, fan_out) in shape.linears.items()}


def get_loss_bytes(shape: ModelShape, layout: Layout, *, tokens: int, residual_bytes: int, autocast: bool,
                   fused_loss: bool, eager: bool, fused_norm: bool) -> float:
    """The last stage's loss at its highest, per micro-batch: the final norm and output layer's saved inputs,
    and (fused) the chunk loop at the end of forward or (logits) the cross entropy's backward."""
    d, v, a, r, tp = shape.dim, shape.vocab, shape.compute_bytes, residual_bytes, layout.tp
    norm = (1 if fused_norm else 2) * r * d * tokens  # the final norm runs eager in compiled models too
    if fused_loss:
        # models/loss.py: grad_hidden and the output-weight gradient (fp32 when summed over chunks) are made in
        # forward and saved; the hidden (already in the compute dtype: the residual stream is) and the weight's
        # compute-dtype copy are held through the chunk loop. Per logits element of a chunk: the logits, the fp32
        # softmax buffer (compiled) or fp32 temporaries (eager), the gradient, and the previous chunk's gradient,
        # still referenced while the next is made.
        chunk_tokens = min(get_chunk_tokens(v), tokens)
        per_element = 3 * a + (12 if eager else 4)
        weight_grad = (4 if chunk_tokens < tokens else a) * v * d
        held = (a + r) * d * tokens + weight_grad + (a * v * d if autocast else 0)
        chunk = chunk_tokens * v
        return norm + held + per_element * chunk
    head = norm + a * d * tokens + (a * v * d / tp if autocast else 0)  # output layer: input, weight copy
    if shape.compile and tp == 1 and layout.pp == 1:
        return head + 2 * a * v * tokens  # compiled cross entropy keeps the logits; backward adds their grad
    # Eager: log_softmax's fp32 output is saved; backward adds two fp32 temporaries.
    held = layout.microbatches if layout.pp_schedule == "gpipe" and layout.pp > 1 else 1
    return head + (4 * held + 8) * v / tp * tokens


def get_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of models/loss.py's fused loss (a power of two)."""
    return 2 ** max(0, (CHUNK_ELEMENTS // vocab).bit_length() - 1)


# ---------------------------------------------------------------------------------------------
# One layout: memory of its fullest ranks, time of its slowest.


def get_model_state_bytes(params: float, layout: Layout) -> dict[str, float]:
    """Parameters, gradients and AdamW state of a rank holding `params` parameters, per ZeRO stage.

    The trainer keeps fp32 parameters and gradients (bf16 is compute only), so against the ZeRO paper's
    2 + 2 + 12 bytes: zero 0 (DDP) 4 + 4 + 8; zero 1 (ZeroRedundancyOptimizer over dp_shard) 4 + 4 + 8/N;
    zero 2 and 3 (FSDP2 over dp_shard, reduce in fp32) (4 + 4 + 8)/N, plus the gathered compute-dtype copies
    that predict() counts separately. Without data parallelism nothing is sharded.
    """
    shard = layout.dp_shard if layout.dp > 1 else 1
    if layout.zero in (2, 3):
        return {"params": 4 * params / shard, "grads": 4 * params / shard, "optim": 8 * params / shard}
    return {"params": 4 * params, "grads": 4 * params, "optim": 8 * params / (shard if layout.zero == 1 else 1)}


@dataclass
class Knobs:
    mfu: float
    mem_overhead_gb: float = 1.0
    dp_overlap: float = DEFAULT_DP_OVERLAP


def get_knobs(gpu: GPU, calibration: dict | None) -> Knobs:
    calibration = calibration or {}
    unknown = set(calibration) - {"mfu", "mem_overhead_gb", "dp_overlap"}
    if unknown:
        raise ValueError(f"calibration: unknown keys {sorted(unknown)}; known: mfu, mem_overhead_gb, dp_overlap")
    return Knobs(mfu=float(calibration.get("mfu", gpu.mfu)),
                 mem_overhead_gb=float(calibration.get("mem_overhead_gb", gpu.mem_overhead_gb)),
                 dp_overlap=float(calibration.get("dp_overlap", DEFAULT_DP_OVERLAP)))


def get_axis_bandwidth(gpu: GPU, stride: int, degree: int, gpus_per_node: int) -> tuple[float, str]:
    """Bytes/s of a collective along a mesh axis: NVLink when the group fits in a node, else the network."""
    if stride * degree <= gpus_per_node:
        return gpu.intra_gbps * 1e9 * COMM_EFFICIENCY, "intra"
    return gpu.inter_gbps * 1e9 * COMM_EFFICIENCY, "inter"


def predict(shape: ModelShape, layout: Layout, gpu: GPU, knobs: Knobs, *, gpus_per_node: int) -> dict:
    """Peak memory (GiB) over the first and last pipeline ranks and the step time (s) of the slowest."""
    L, p, tp = layout, layout.pp, layout.tp
    dp, shard = L.dp, L.dp_shard
    mode = "none" if dp == 1 else ("ddp" if L.zero in (0, 1) else "fsdp")
    autocast = shape.precision != "fp32" and mode != "fsdp"
    residual = 4 if shape.precision == "fp32" else 2  # autocast casts the embedding output (models/llama.py)
    block = get_block_setup(shape)
    eager = not shape.compile
    a, c = shape.compute_bytes, shape.compute_bytes  # activation bytes; FSDP's unsharded param bytes
    rows = shape.batch // dp
    accumulation = rows // (L.micro_batch_size * L.microbatches)
    tokens = L.micro_batch_size * shape.seq  # per micro-batch
    num_stages = p * L.virtual_stages
    stage_layers = [len(names) for names in get_stage_layers(shape.layers, num_stages)]
    layer_param = shape.matmul_params / tp + 2 * shape.dim
    full_layer = get_layer_activation_bytes(shape, L, block, residual_bytes=residual, eager=eager,
                                            fused_norm=gpu.fused_rms_norm)
    ac_share = 1.0 / shape.ac_every if L.ac != "none" else 0.0
    if L.ac == "full":
        kept, recompute_params = residual * shape.dim / (tp if L.sequence_parallel else 1), shape.matmul_params
    elif L.ac == "selective":
        kept, recompute_params = get_selective_bytes(shape, L, residual_bytes=residual, eager=eager)
    else:
        kept, recompute_params = full_layer, 0
    per_layer = ac_share * kept + (1 - ac_share) * full_layer
    layer_copies = get_weight_copy_bytes(shape, L, block, autocast=autocast)
    loss_parallel, pipelined = tp > 1, p > 1
    fused_loss = shape.fused_loss and not pipelined and not loss_parallel

    worst_mem, worst_time = None, None
    for rank in sorted({0, p - 1}):
        stages = get_stage_ids(rank, p, L.virtual_stages, L.pp_schedule)
        layers = sum(stage_layers[s] for s in stages)
        first, last = 0 in stages, num_stages - 1 in stages
        root = (shape.embedding_params / tp if first else 0) + ((shape.output_params / tp + shape.dim) if last else 0)
        params = layers * layer_param + root

        states = get_model_state_bytes(params, L)
        mem = {"params": states["params"], "grads": 0.0, "optim": states["optim"]}
        grads_full = states["grads"]
        if mode == "ddp":
            mem["ddp_buckets"] = 4 * params  # DDP's flat gradient buckets (gradient_as_bucket_view off)
        elif mode == "fsdp":
            if L.zero == 2 or pipelined:  # gathered from forward to backward (pipelining keeps them to the end)
                mem["unsharded_params"] = c * params
            else:
                mem["unsharded_params"] = c * (min(2, layers) * layer_param + root)  # this block + the prefetched one
            if accumulation > 1 or pipelined:  # no-sync backward accumulates unsharded grads in the fp32 reduce dtype
                mem["unsharded_grads"] = 4 * params
            mem["reduce_buffers"] = (c + 4 if c != 4 else 4) * layer_param
        if (accumulation > 1 or pipelined) and mode != "fsdp":
            mem["grads"] = grads_full  # earlier slices' gradients are present during the next forward
        mem["weight_copies"] = layers * (1 - ac_share) * layer_copies  # checkpointed blocks recompute theirs

        # Activations: in-flight microbatches x this rank's layers (chunks share layers evenly) x per-layer bytes.
        in_flight = get_in_flight(L, rank)
        act_layers = layers * in_flight / (L.virtual_stages if L.virtual_stages > 1 else 1)
        mem["activations"] = act_layers * tokens * per_layer
        if L.ac != "none":  # the part of one block that recompute rebuilds, while that block runs backward
            mem["recompute"] = tokens * (full_layer - kept) + layer_copies
        if last:
            mem["loss"] = get_loss_bytes(shape, L, tokens=tokens, residual_bytes=residual, autocast=autocast,
                                         fused_loss=fused_loss, eager=eager, fused_norm=gpu.fused_rms_norm)
        # Peak: the loss (end of forward, or its backward) and a block's backward (recompute, FSDP's reduce
        # buffers) come one after the other over the activations; at the end of backward every gradient is made.
        transient = ("activations", "recompute", "loss", "reduce_buffers")
        persistent = sum(v for k, v in mem.items() if k not in transient)
        loss_phase = mem.get("loss", 0.0)
        block_phase = mem.get("recompute", 0.0) + mem.get("reduce_buffers", 0.0)
        fwd_bwd = persistent + mem["activations"] + max(loss_phase, block_phase)
        end_bwd = persistent - mem["grads"] + grads_full
        total = max(fwd_bwd, end_bwd) * (1 + ALLOCATOR_SLACK) + knobs.mem_overhead_gb * GIB
        if worst_mem is None or total > worst_mem[0]:
            phase = "loss" if loss_phase >= block_phase else "block backward"
            phase = phase if fwd_bwd >= end_bwd else "backward end"
            worst_mem = (total, mem, phase, rank)

        # Time: compute at a calibrated share of peak, exposed communication, bubble, optimizer.
        slices = accumulation * L.microbatches  # micro-batches this rank runs per step
        layer_flops = shape.layer_flops + (2 * shape.layer_params + 4 * shape.dim * shape.seq
                                           if L.ac == "full" else 2 * recompute_params) * ac_share
        flops = slices * tokens * (layers * layer_flops + (shape.head_flops if last else 0)) / tp
        size = tokens * shape.dim / tp
        efficiency = knobs.mfu * (EAGER_EFFICIENCY if eager else 1.0) * size / (size + gpu.size_half)
        if shape.precision == "fp8" and gpu.fp8_tflops:
            fp8_params = sum(n for name, n in get_linear_params(shape).items() if name in block.fp8)
            fp8_flops = slices * tokens * (layers * 6 * fp8_params
                                           + (6 * shape.vocab * shape.dim if last and shape.fp8_output else 0)) / tp
            t_compute = ((flops - fp8_flops) / (gpu.bf16_tflops * 1e12 * efficiency)
                         + fp8_flops / (gpu.fp8_tflops * 1e12 * efficiency * FP8_EFFICIENCY))
        else:
            peak = gpu.fp32_tflops if shape.precision == "fp32" else gpu.bf16_tflops
            t_compute = flops / (peak * 1e12 * efficiency)
        # Floor: per-kernel overhead; recompute reruns forward kernels in proportion to its FLOPs.
        kernels = slices * layers * KERNELS_PER_LAYER[not eager] * layer_flops / shape.layer_flops
        t_compute = max(t_compute, kernels * LAUNCH_S)
        t_tp = 0.0
        if tp > 1:
            bw, _ = get_axis_bandwidth(gpu, 1, tp, gpus_per_node)
            per_layer_collectives = 4 + (2 if L.ac != "none" else 0)  # recompute reruns the forward's two
            collectives = slices * (layers * per_layer_collectives + 2)  # + embedding and loss
            t_tp = collectives * 2 * (tp - 1) / tp * tokens * shape.dim * a / bw
        t_p2p = 0.0
        if pipelined:
            stride = tp * dp
            bw, _ = get_axis_bandwidth(gpu, stride, p, gpus_per_node)
            boundary = tokens * shape.dim * a / (tp if L.sequence_parallel else 1)
            t_p2p = 2 * slices * L.virtual_stages * boundary / bw
        # Zero-bubble schedules get the interleaved formula: an upper bound. Idle share b stretches time by 1/(1-b).
        bubble = get_bubble_fraction(L.pp_schedule, p, L.microbatches, L.virtual_stages)
        t_pipeline = (t_compute + t_tp + t_p2p) / (1 - bubble)

        t_dp, where = 0.0, "-"
        if mode == "ddp":
            group, stride = (L.dp_replicate, tp) if L.zero == 0 else (shard, tp)
            bw, where = get_axis_bandwidth(gpu, stride, group, gpus_per_node)
            volume = 2 * (group - 1) / group * 4 * params  # fp32 gradient all-reduce
            if L.zero == 1:
                volume += (group - 1) / group * 4 * params  # each owner broadcasts its updated shard
            t_dp = volume / bw
        elif mode == "fsdp":
            bw, where = get_axis_bandwidth(gpu, tp, shard, gpus_per_node)
            gathers = (1 if L.zero == 2 else 2) * accumulation
            t_dp = (shard - 1) / shard * (4 * params + gathers * c * params) / bw  # fp32 reduce-scatter, gathers
            if L.dp_replicate > 1:
                bw_r, where_r = get_axis_bandwidth(gpu, tp * shard, L.dp_replicate, gpus_per_node)
                t_dp += 2 * (L.dp_replicate - 1) / L.dp_replicate * 4 * params / shard / bw_r
                where = where if where == where_r else f"{where}+{where_r}"
        # Collectives hide behind compute up to dp_overlap of it; one unit's worth (the last bucket) never does.
        t_dp_exposed = max(t_dp - knobs.dp_overlap * t_compute, t_dp / (layers + 1)) if t_dp else 0.0
        optim_params = params / shard if (mode == "fsdp" or L.zero == 1) and dp > 1 else params
        bandwidth = gpu.hbm_tbps * 1e12 * OPTIMIZER_BANDWIDTH_SHARE[shape.optim_compile]
        t_optimizer = OPTIMIZER_BYTES[shape.optim_compile] * optim_params / bandwidth
        step = t_pipeline + t_dp_exposed + t_optimizer
        if worst_time is None or step > worst_time["step"]:
            worst_time = {"compute": t_compute, "tp_comm": t_tp, "pp_p2p": t_p2p,
                          "bubble": t_pipeline - (t_compute + t_tp + t_p2p), "dp_comm": t_dp, "dp_exposed": t_dp_exposed,
                          "optimizer": t_optimizer, "step": step, "bubble_fraction": bubble, "dp_link": where,
                          "efficiency": efficiency, "rank": rank, "accumulation": accumulation}

    total, mem, phase, rank = worst_mem
    mem_gib = {k: round(v / GIB, 6) for k, v in mem.items() if v}
    mem_gib.update(peak_phase=phase, rank=rank, overhead=knobs.mem_overhead_gb, total=round(total / GIB, 3))
    times = {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in worst_time.items()}
    step = worst_time["step"]
    tokens_per_s = shape.batch * shape.seq / step
    peak = gpu.fp32_tflops if shape.precision == "fp32" else gpu.bf16_tflops
    return {
        "fits": total / GIB + gpu.untracked_gb <= gpu.hbm_gib,
        "pred_mem_gb": round(total / GIB, 2),
        "pred_step_s": float(f"{step:.5g}"),
        "pred_tokens_per_s": round(tokens_per_s, 1),
        "pred_mfu": round(tokens_per_s * shape.flops_per_token / (L.world_size * peak * 1e12), 4),
        "breakdown": {"mem": mem_gib, "time": times},
    }
