"""The layout planner (parallel/plan.py, parallel/plan_model.py): enumeration validity, cost-model
invariants, speed at 10,240 GPUs, the CLI, calibration, the trainer hook, and the byte accounting against
a real model on CPU (parameters, gradients and AdamW state; tensors saved for backward).
"""
from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from models import ModelConfig, Transformer, count_params
from parallel.plan import PlannerCheck, apply_layout, load_calibration, main, plan_layouts, predict_layout
from parallel.plan_model import (GPUS, Knobs, Layout, ModelShape, get_bubble, get_layer_activation_bytes,
                                 get_model_state_bytes, get_weight_copy_bytes, predict)
from trainer.config import Config, ConfigError, TrainConfig, validate

AXES = ("pp", "dp_replicate", "dp_shard", "tp")


def make_config(model: ModelConfig | None = None, **train) -> Config:
    """A Config without hydra: the debug-sized model unless given, bf16 + compile like the GPU recipes."""
    model = model or ModelConfig(vocab_size=384, dim=64, num_layers=4, num_heads=4, num_kv_heads=4, ffn_dim=128,
                                 max_seq_len=256)
    settings = dict(seq_len=64, global_batch_size=16, micro_batch_size=16, precision="bf16", compile=True)
    settings.update(train)
    return Config(model=model, train=TrainConfig(**settings))


def layout(**kwargs) -> Layout:
    base = dict(pp=1, dp_replicate=1, dp_shard=1, tp=1, zero=3, pp_schedule="1f1b", virtual_stages=1,
                microbatches=1, micro_batch_size=1, ac="none", sequence_parallel=False)
    base.update(kwargs)
    return Layout(**base)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    sections = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        typed = {"true": True, "false": False}.get(value, int(value) if value.lstrip("-").isdigit() else value)
        sections.setdefault(section, {})[name] = typed
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def price(cfg: Config, gpu: str = "h100", **kwargs) -> dict:
    return predict(ModelShape(cfg), layout(**kwargs), GPUS[gpu], Knobs(mfu=0.5), gpus_per_node=8)


def test_every_layout_is_valid_and_stays_in_a_node():
    cfg = make_config()
    entries = plan_layouts(cfg, world_size=8, gpu="h100", gpus_per_node=4)
    assert len(entries) > 100
    schema = OmegaConf.structured(cfg)
    seen = set()
    for index, entry in enumerate(entries):
        # The overrides alone, applied to the recipe, give a config validate accepts (OmegaConf, as the trainer's
        # CLI applies them, on a sample: it costs ~10 ms each).
        applied = apply_overrides(cfg, entry["overrides"])
        if index % 50 == 0:
            assert applied == OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(entry["overrides"])))
        degrees = validate(applied, 8)
        assert degrees == entry["degrees"]
        assert degrees["pp"] * degrees["dp_replicate"] * degrees["dp_shard"] * degrees["tp"] == 8
        assert degrees["tp"] <= 4 and 4 % degrees["tp"] == 0
        seen.add((degrees["tp"], applied.parallel.pp_schedule, applied.train.activation_checkpointing,
                  applied.parallel.sequence_parallel, applied.parallel.zero))
    # The enumeration covers the knobs it claims to.
    assert {s[0] for s in seen} == {1, 2, 4}
    assert {s[1] for s in seen} >= {"gpipe", "1f1b", "interleaved_1f1b"}
    assert {s[2] for s in seen} == {"none", "selective", "full"}
    assert {s[3] for s in seen} == {False, True}
    assert {s[4] for s in seen} == {0, 1, 2, 3}
    fitting = [e for e in entries if e["fits"]]
    speeds = [e["pred_tokens_per_s"] for e in fitting]
    assert speeds == sorted(speeds, reverse=True) and fitting == entries[: len(fitting)]


def test_zero3_model_states_shrink_with_dp_shard():
    cfg = make_config()
    params = count_params(cfg.model)
    for zero in (2, 3):
        states = {s: sum(get_model_state_bytes(params, layout(dp_shard=s, zero=zero)).values()) for s in (1, 2, 4, 8)}
        assert states[1] == 16 * params
        for s in (2, 4, 8):
            assert states[s] == pytest.approx(states[1] / s)
    # ZeRO-1 shards only the AdamW state; DDP nothing.
    assert sum(get_model_state_bytes(params, layout(dp_shard=4, zero=1)).values()) == pytest.approx((4 + 4 + 2) * params)
    assert sum(get_model_state_bytes(params, layout(dp_replicate=4, zero=0)).values()) == 16 * params
    # And through the whole prediction: the sharded parameters and optimizer state of each rank.
    big = make_config(model=ModelConfig(vocab_size=32000, dim=1024, num_layers=8, num_heads=8, num_kv_heads=8,
                                        ffn_dim=2816, max_seq_len=2048))
    mems = [price(big, dp_shard=s)["breakdown"]["mem"] for s in (2, 8)]
    assert mems[0]["params"] + mems[0]["optim"] == pytest.approx(4 * (mems[1]["params"] + mems[1]["optim"]), rel=1e-3)


def test_bubble_formulas():
    assert get_bubble("gpipe", 4, 8, 1) == (pytest.approx(3 / 11), pytest.approx(11 / 8))
    assert get_bubble("1f1b", 8, 24, 1)[0] == pytest.approx(7 / 31)
    assert get_bubble("interleaved_1f1b", 4, 8, 2) == (pytest.approx(3 / 16), pytest.approx(1 + 3 / 16))
    assert get_bubble("1f1b", 1, 1, 1) == (0.0, 1.0)


def test_more_microbatches_less_bubble_and_time():
    cfg = make_config(global_batch_size=64, micro_batch_size=1)
    previous = None
    for m in (4, 8, 16, 32):
        result = price(cfg, pp=4, microbatches=m, micro_batch_size=1)
        bubble = result["breakdown"]["time"]["bubble_fraction"]
        if previous:
            assert bubble < previous[0] and result["breakdown"]["time"]["bubble"] < previous[1]
        previous = bubble, result["breakdown"]["time"]["bubble"]
    # Interleaving shrinks it further at the same microbatch count.
    plain = price(cfg, pp=2, microbatches=8)["breakdown"]["time"]["bubble_fraction"]
    interleaved = price(cfg, pp=2, microbatches=8, pp_schedule="interleaved_1f1b", virtual_stages=2)
    assert interleaved["breakdown"]["time"]["bubble_fraction"] < plain


def test_checkpointing_trades_activation_memory_for_time():
    cfg = make_config(model=ModelConfig(vocab_size=32000, dim=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                                        ffn_dim=5632, max_seq_len=2048), seq_len=2048, global_batch_size=8)
    results = {ac: price(cfg, ac=ac, micro_batch_size=8) for ac in ("none", "selective", "full")}
    activations = {ac: r["breakdown"]["mem"]["activations"] for ac, r in results.items()}
    assert activations["full"] < activations["selective"] < activations["none"]
    steps = {ac: r["pred_step_s"] for ac, r in results.items()}
    assert steps["none"] < steps["selective"] < steps["full"]
    # Full recompute adds one forward: about 4/3 of the block compute.
    ratio = results["full"]["breakdown"]["time"]["compute"] / results["none"]["breakdown"]["time"]["compute"]
    assert 1.25 < ratio < 4 / 3
    # Sequence parallelism divides the norms' activations by tp; pipelining (1F1B) keeps pp microbatches in flight.
    tp_plain, tp_sp = (price(cfg, tp=4, micro_batch_size=8, sequence_parallel=sp) for sp in (False, True))
    assert tp_sp["breakdown"]["mem"]["activations"] < tp_plain["breakdown"]["mem"]["activations"]
    gpipe, one_f_one_b = (price(cfg, pp=2, microbatches=8, pp_schedule=s)["breakdown"]["mem"]["activations"]
                          for s in ("gpipe", "1f1b"))
    assert gpipe == pytest.approx(4 * one_f_one_b, rel=0.02)  # stage 0 holds 8 against 2 microbatches


def test_70b_on_10240_gpus_answers_in_seconds():
    llama_70b = ModelConfig(vocab_size=128256, dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_dim=28672,
                            max_seq_len=4096, rope_theta=500000.0)
    cfg = make_config(model=llama_70b, seq_len=4096, global_batch_size=1024, micro_batch_size=1)
    start = time.perf_counter()
    entries = plan_layouts(cfg, world_size=10240, gpu="h100")
    elapsed = time.perf_counter() - start
    assert elapsed < 8.0, f"{elapsed:.1f} s"
    best = entries[0]
    assert best["fits"] and best["degrees"]["tp"] <= 8
    assert 0.01 < best["pred_mfu"] < 0.7
    # 70B does not fit one 8-GPU node with AdamW in fp32 (16 bytes/parameter = 1.1 TB).
    assert not any(e["fits"] for e in plan_layouts(cfg, world_size=8, gpu="h100"))


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["recipe=debug", "world_size=4", "gpu=h100", "gpus_per_node=4", "top=5", f"json={out}",
                 "train.global_batch_size=16"]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "best: parallel.pp=" in text
    assert len([line for line in text.splitlines() if line.strip()[:2].strip().isdigit()]) == 5
    data = json.loads(out.read_text())
    assert data["world_size"] == 4 and len(data["layouts"]) > 5
    for key in ("overrides", "layout", "fits", "pred_mem_gb", "pred_step_s", "pred_tokens_per_s", "pred_mfu", "breakdown"):
        assert key in data["layouts"][0]
    assert main(["recipe=debug", "world_size=4", "gpu=tpu9"]) == 2
    assert "no entry" in capsys.readouterr().err


def test_calibration_changes_predictions(tmp_path):
    cfg = make_config(model=ModelConfig(vocab_size=32000, dim=1024, num_layers=8, num_heads=8, num_kv_heads=8,
                                        ffn_dim=2816, max_seq_len=2048), seq_len=2048, global_batch_size=8,
                      micro_batch_size=8)
    with pytest.raises(ConfigError, match="micro_batch_size"):  # an invalid config is refused, not priced
        predict_layout(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=16)),
                       {a: 1 for a in AXES}, gpu="h100")
    base = predict_layout(cfg, {a: 1 for a in AXES}, gpu="h100")
    slow = predict_layout(cfg, {a: 1 for a in AXES}, gpu="h100", calibration={"mfu": base["breakdown"]["time"]["efficiency"]})
    assert slow["pred_step_s"] != base["pred_step_s"]
    heavy = predict_layout(cfg, {a: 1 for a in AXES}, gpu="h100", calibration={"mem_overhead_gb": 11.0})
    assert heavy["pred_mem_gb"] == pytest.approx(base["pred_mem_gb"] + 10.0, abs=0.02)
    with pytest.raises(Exception, match="unknown keys"):
        predict_layout(cfg, {a: 1 for a in AXES}, gpu="h100", calibration={"mfuu": 0.3})

    # Fitted to a bench record: a run measured at a known efficiency and 3 GiB of overhead gives both back.
    from trainer.config import load_config

    bench = load_config(["recipe=bench_1b", "train.global_batch_size=4", "train.micro_batch_size=4",
                         "train.activation_checkpointing=selective"], world_size=1)
    truth = predict(ModelShape(bench), layout(micro_batch_size=4, ac="selective"), GPUS["h100"],
                    Knobs(mfu=0.37, mem_overhead_gb=3.0), gpus_per_node=8)
    record = {"recipe": "bench_1b", "device": "NVIDIA H100 80GB HBM3", "world_size": 1, "precision": "bf16",
              "compile": True, "activation_checkpointing": "selective", "batch": 4, "seq_len": 2048,
              "tokens_per_s": truth["pred_tokens_per_s"], "peak_mem_gb": truth["pred_mem_gb"]}
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "world_size": 8}) + "\n")
    knobs, notes = load_calibration(str(path), precision="bf16")
    assert knobs["mfu"] == pytest.approx(0.37, rel=0.01)
    assert knobs["mem_overhead_gb"] == pytest.approx(3.0, abs=0.02)
    assert any("skipped" in note for note in notes)
    plain = tmp_path / "calib.json"
    plain.write_text(json.dumps({"mfu": 0.3, "mem_overhead_gb": 2.0}))
    assert load_calibration(str(plain))[0] == {"mfu": 0.3, "mem_overhead_gb": 2.0}


def test_model_states_match_a_real_model_on_cpu(one_thread):
    """Parameters, gradients and AdamW state of a built model, against the zero-0 accounting."""
    cfg = make_config(precision="fp32", compile=False, global_batch_size=4, micro_batch_size=2)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17))
    torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optim_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for name, t in state.items() if name != "step")
    predicted = predict_layout(cfg, {a: 1 for a in AXES}, gpu="cpu")["breakdown"]["mem"]
    gib = 2**30
    assert predicted["params"] * gib == pytest.approx(param_bytes, rel=1e-3)
    assert predicted["optim"] * gib == pytest.approx(optim_bytes, rel=1e-3)
    assert predicted["grads"] * gib == pytest.approx(grad_bytes, rel=1e-3)  # accumulation 2: present in forward


def _saved_bytes(block, x, rope, *, autocast: bool) -> int:
    """Bytes of distinct storages autograd saves for backward in one block's forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_bytes_match_saved_tensors_on_cpu(precision, one_thread):
    """The per-token and per-layer constant terms of the eager accounting, against what autograd saves."""
    model_cfg = ModelConfig(vocab_size=384, dim=128, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=384,
                            max_seq_len=256)
    cfg = make_config(model=model_cfg, precision=precision, compile=False)
    model = Transformer(model_cfg)
    block = model.layers["0"]
    measured = {}
    for batch, seq in ((2, 64), (4, 64)):
        x = torch.randn(batch, seq, model_cfg.dim, requires_grad=True)
        rope = (model.rope_cos[:seq], model.rope_sin[:seq])
        measured[batch * seq] = _saved_bytes(block, x, rope, autocast=precision == "bf16")
    per_token = (measured[256] - measured[128]) / 128
    constant = measured[128] - 128 * per_token
    shape, single = ModelShape(cfg), layout()
    residual = 4  # fp32, or bf16 autocast over fp32 parameters
    predicted = get_layer_activation_bytes(shape, single, residual_bytes=residual, fused=True, eager=True)
    assert per_token == pytest.approx(predicted, rel=0.05)
    weights = get_weight_copy_bytes(shape, single, autocast=precision == "bf16", fused=True)
    assert constant == pytest.approx(weights, rel=0.1, abs=64 * 1024)


def test_trainer_hook_logs_prediction_then_measurement():
    cfg = make_config()
    lines = []
    check = PlannerCheck(cfg, {a: 1 for a in AXES}, torch.device("cpu"), log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("planner (cpu):") and "GiB" in lines[0]
    check.maybe_log(10, 100, {"tokens_per_s": 1000.0, "mem_gb": 1.5})
    assert len(lines) == 1  # still warming up
    check.maybe_log(30, 100, {"tokens_per_s": 1024.0, "mem_gb": 1.5})
    check.maybe_log(40, 100, {"tokens_per_s": 1024.0, "mem_gb": 1.5})
    assert len(lines) == 2 and "measured 1.5 GiB / 1 s" in lines[1]
    # A short run reports at its last step; an unknown device or a broken input logs one line, never raises.
    short = PlannerCheck(cfg, {a: 1 for a in AXES}, torch.device("cpu"), log=lines.append)
    short.maybe_log(5, 5, {"tokens_per_s": 1024.0, "mem_gb": 1.0})
    assert "measured 1.0 GiB" in lines[-1]
    PlannerCheck(cfg, {a: 1 for a in AXES}, torch.device("meta"), log=lines.append)
    assert "no GPU entry for 'meta'" in lines[-1]
    PlannerCheck(cfg, {"pp": 1, "dp_replicate": 1, "dp_shard": 1}, torch.device("cpu"), log=lines.append)
    assert lines[-1].startswith("planner: no prediction")


def test_apply_layout_leaves_the_input_alone():
    cfg = make_config()
    changed = apply_layout(cfg, layout(pp=2, microbatches=4, ac="full"))
    assert changed.parallel.pp == 2 and changed.train.activation_checkpointing == "full"
    assert cfg.parallel.pp == 1 and cfg.train.activation_checkpointing == "none"
