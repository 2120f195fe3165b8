"""Plans for large meshes, checked in one process with the fake process group: mesh axes and ranks,
pipeline stage contents, local shard shapes and placements of every parameter, and the bubble formula.

Models stay on the meta device, so a Llama-3.2-1B-shaped model costs nothing; the fake group moves no
data. FSDP refuses to run forward on meta parameters, so forward/backward shapes are checked on
TP-only stages. Numerics live in test_layouts.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel
from torch.distributed.tensor.placement_types import _StridedShard

from distributed import fake_process_group
from models import Transformer
from parallel import build_mesh, get_dp_rank_and_size, parallelize
from parallel.pipeline import get_bubble_fraction, get_stage_ids, get_stage_layers, split_stage
from trainer.config import load_config

# Llama-3.2-1B (configs/model/llama_1b.yaml): dim 2048, 16 layers, 32 heads / 8 kv heads of 64, ffn 8192.
VOCAB, DIM, KV_DIM, FFN, LAYERS = 100352, 2048, 512, 8192, 16


def get_config(world_size: int, monkeypatch, *overrides: str):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))  # load_config validates against the launcher's world size
    return load_config(["model=llama_1b", "train.micro_batch_size=1", "run.device=cpu", *overrides])


def get_degrees(cfg) -> dict[str, int]:
    return {axis: getattr(cfg.parallel, axis) for axis in ("pp", "dp_replicate", "dp_shard", "tp")}


def build_stage(cfg, degrees: dict[str, int], mesh, stage_id: int):
    with torch.device("meta"):
        full = Transformer(cfg.model)
    stage = split_stage(full, stage_id, degrees["pp"] * cfg.parallel.virtual_stages)
    return parallelize(stage, mesh, cfg, degrees)


def get_block_expectations(tp: int, dp: int) -> dict[str, tuple]:
    """Per block parameter: (global shape, local shape, placement on the tp axis). FSDP shards dim 0 over dp."""
    return {
        "attention_norm.weight": ((DIM,), (DIM // dp,), Replicate()),
        "attention.wq.weight": ((DIM, DIM), (DIM // tp // dp, DIM), Shard(0)),  # column parallel: heads split
        "attention.wk.weight": ((KV_DIM, DIM), (KV_DIM // tp // dp, DIM), Shard(0)),
        "attention.wv.weight": ((KV_DIM, DIM), (KV_DIM // tp // dp, DIM), Shard(0)),
        "attention.wo.weight": ((DIM, DIM), (DIM // dp, DIM // tp), Shard(1)),  # row parallel
        "ffn_norm.weight": ((DIM,), (DIM // dp,), Replicate()),
        "feed_forward.w1.weight": ((FFN, DIM), (FFN // tp // dp, DIM), Shard(0)),
        "feed_forward.w3.weight": ((FFN, DIM), (FFN // tp // dp, DIM), Shard(0)),
        "feed_forward.w2.weight": ((DIM, FFN), (DIM // dp, FFN // tp), Shard(1)),
    }


def get_top_expectations(tp: int, dp: int) -> dict[str, tuple]:
    return {
        "tok_embeddings.weight": ((VOCAB, DIM), (VOCAB // tp // dp, DIM), Shard(0)),  # vocab parallel
        "norm.weight": ((DIM,), (DIM // dp,), Replicate()),
        "output.weight": ((VOCAB, DIM), (VOCAB // tp // dp, DIM), Shard(0)),  # vocab-sharded logits
    }


def check_params(part, layers: list[str], top: list[str], *, tp: int, dp: int, dp_axes: tuple[str, ...]) -> None:
    expected = {f"layers.{layer}.{name}": value for layer in layers
                for name, value in get_block_expectations(tp, dp).items()}
    expected.update({name: value for name, value in get_top_expectations(tp, dp).items() if name.split(".")[0] in top})
    params = dict(part.named_parameters())
    assert params.keys() == expected.keys()
    for name, (global_shape, local_shape, tp_placement) in expected.items():
        param = params[name]
        assert isinstance(param, DTensor), name
        assert param.device_mesh.mesh_dim_names == (*dp_axes, "tp"), name
        assert tuple(param.shape) == global_shape, name
        assert tuple(param.to_local().shape) == local_shape, name
        assert param.placements[-1] == tp_placement, name
        *dp_placements, _ = param.placements
        if "dp_replicate" in dp_axes:
            assert dp_placements[0] == Replicate(), name
        # FSDP shards dim 0; where tp already split it, the dp shard is strided (every tp-th chunk).
        expected_dp = _StridedShard(0, split_factor=tp) if tp_placement == Shard(0) else Shard(0)
        assert dp_placements[-1] == expected_dp, name


# ---------------------------------------------------------------------------------------------
# 1024 ranks: pp8 x dp_shard16 x tp8 (ZeRO-3)


@pytest.mark.parametrize("rank", [0, 517, 1023])
def test_mesh_1024_ranks(rank, monkeypatch):
    cfg = get_config(1024, monkeypatch, "parallel.pp=8", "parallel.dp_shard=16", "parallel.tp=8",
                     "train.global_batch_size=128")
    with fake_process_group(rank, 1024):
        mesh = build_mesh(get_degrees(cfg), "cpu")
        assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "tp")
        assert tuple(mesh.shape) == (8, 1, 16, 8)
        # Outer to inner: tp varies fastest, so a tp group is 8 neighbouring ranks (one node).
        assert [mesh.get_local_rank(a) for a in ("pp", "dp_shard", "tp")] == [rank // 128, rank // 8 % 16, rank % 8]
        assert mesh["tp"].mesh.tolist() == list(range(rank - rank % 8, rank - rank % 8 + 8))
        assert mesh["pp"].mesh.tolist() == [rank % 128 + 128 * s for s in range(8)]
        assert get_dp_rank_and_size(mesh) == (rank // 8 % 16, 16)


@pytest.mark.parametrize("rank", [0, 1023])
def test_shards_1024_ranks(rank, monkeypatch):
    cfg = get_config(1024, monkeypatch, "parallel.pp=8", "parallel.dp_shard=16", "parallel.tp=8", "parallel.zero=3",
                     "train.global_batch_size=128")
    degrees = get_degrees(cfg)
    with fake_process_group(rank, 1024):
        mesh = build_mesh(degrees, "cpu")
        stage_id = mesh.get_local_rank("pp")
        part = build_stage(cfg, degrees, mesh, stage_id)
        layers = [str(2 * stage_id), str(2 * stage_id + 1)]  # 16 layers over 8 stages
        top = (["tok_embeddings"] if stage_id == 0 else []) + (["norm", "output"] if stage_id == 7 else [])
        assert list(part.layers.keys()) == layers
        check_params(part, layers, top, tp=8, dp=16, dp_axes=("dp_shard",))


# ---------------------------------------------------------------------------------------------
# 64 ranks: HSDP 2 x 4 with tp8


@pytest.mark.parametrize("rank", [0, 37])
def test_hsdp_tp_64_ranks(rank, monkeypatch):
    cfg = get_config(64, monkeypatch, "parallel.dp_replicate=2", "parallel.dp_shard=4", "parallel.tp=8",
                     "parallel.zero=3", "train.global_batch_size=8")
    degrees = get_degrees(cfg)
    with fake_process_group(rank, 64):
        mesh = build_mesh(degrees, "cpu")
        assert get_dp_rank_and_size(mesh) == (rank // 32 * 4 + rank // 8 % 4, 8)
        part = build_stage(cfg, degrees, mesh, 0)
        check_params(part, [str(i) for i in range(LAYERS)], ["tok_embeddings", "norm", "output"], tp=8, dp=4,
                     dp_axes=("dp_replicate", "dp_shard"))


# ---------------------------------------------------------------------------------------------
# Activations across a pipeline stage boundary under TP (meta tensors; FSDP would refuse them)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp_stage_boundary_shapes(sequence_parallel, monkeypatch):
    tp, batch, seq = 8, 2, 256
    cfg = get_config(16, monkeypatch, "parallel.pp=2", f"parallel.tp={tp}", f"train.seq_len={seq}",
                     f"parallel.sequence_parallel={str(sequence_parallel).lower()}", "train.global_batch_size=2")
    degrees = get_degrees(cfg)
    boundary = (batch, seq // tp if sequence_parallel else seq, DIM)  # what one rank sends to the next stage
    with fake_process_group(9, 16):
        mesh = build_mesh(degrees, "cpu")
        first, last = build_stage(cfg, degrees, mesh, 0), build_stage(cfg, degrees, mesh, 1)
        # No plain parameters: foreach optimizer and clipping kernels take no mix of tensors and DTensors.
        assert all(isinstance(p, DTensor) for part in (first, last) for p in part.parameters())
        hidden = first(torch.zeros(batch, seq, dtype=torch.long, device="meta"))
        assert not isinstance(hidden, DTensor) and tuple(hidden.shape) == boundary
        # The later stage reads positions off a sequence shard: it must still see the whole sequence.
        received = torch.zeros(boundary, device="meta", requires_grad=True)
        with loss_parallel():
            logits = last(received)
            assert tuple(logits.shape) == (batch, seq, VOCAB) and logits.placements == (Shard(2),)
            assert tuple(logits.to_local().shape) == (batch, seq, VOCAB // tp)
            targets = torch.zeros(batch * seq, dtype=torch.long, device="meta")
            F.cross_entropy(logits.flatten(0, 1), targets).backward()
        assert tuple(received.grad.shape) == boundary


# ---------------------------------------------------------------------------------------------
# Pure plan functions


def test_stage_layers_and_ids():
    assert get_stage_layers(16, 8) == [[str(2 * s), str(2 * s + 1)] for s in range(8)]
    assert get_stage_layers(10, 4) == [["0", "1", "2"], ["3", "4", "5"], ["6", "7"], ["8", "9"]]  # earlier stages take the rest
    assert get_stage_ids(1, 4, 1, "1f1b") == [1]
    assert get_stage_ids(1, 4, 2, "interleaved_1f1b") == [1, 5]  # looped
    assert get_stage_ids(1, 4, 2, "zbv") == [1, 6]  # V-shaped: the first and last stage share rank 0
    assert get_stage_ids(0, 4, 2, "zbv") == [0, 7]


def test_split_stage_keeps_names():
    with torch.device("meta"):
        full = Transformer(load_config(["model=llama_1b"]).model)
    stages = [split_stage(full, s, 4) for s in range(4)]
    names = [n for stage in stages for n, _ in stage.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in full.named_parameters())  # each parameter on exactly one stage
    assert stages[0].tok_embeddings is not None and all(s.tok_embeddings is None for s in stages[1:])
    assert stages[3].output is not None and all(s.output is None and s.norm is None for s in stages[:3])


@pytest.mark.parametrize("schedule, pp, microbatches, virtual, expected", [
    ("gpipe", 8, 32, 1, 7 / 39),  # (p - 1) / (m + p - 1)
    ("1f1b", 4, 4, 1, 3 / 7),
    ("1f1b", 1, 4, 1, 0.0),
    ("interleaved_1f1b", 8, 32, 2, 7 / 71),  # (p - 1) / (v m + p - 1)
])
def test_bubble_fraction(schedule, pp, microbatches, virtual, expected):
    assert get_bubble_fraction(schedule, pp, microbatches, virtual) == pytest.approx(expected)
    # More microbatches always shrink the bubble.
    assert get_bubble_fraction(schedule, pp, 2 * microbatches, virtual) <= get_bubble_fraction(schedule, pp, microbatches, virtual)


def test_describe_layout_names_what_applies():
    from parallel.mesh import describe_layout
    from trainer.config import ParallelConfig

    one = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}
    assert describe_layout(ParallelConfig(), one) == "pp=1 x dp_replicate=1 x dp_shard=1 x tp=1"  # no ZeRO without dp
    hybrid = ParallelConfig(zero=2, sequence_parallel=True, pp_schedule="interleaved_1f1b", virtual_stages=2)
    assert describe_layout(hybrid, {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 2}) == (
        "pp=2 x dp_replicate=1 x dp_shard=2 x tp=2, zero=2, sequence parallel, interleaved_1f1b x2")
