"""What the speed features promise, checked on CPU: the fused output-layer loss equals the plain
computation, fp8 conversion picks the right modules, activation checkpointing wraps the right
blocks and keeps numerics, a compiled block matches eager, and the MFU/HFU arithmetic on known shapes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models.loss
from models import ModelConfig, Transformer, flops_per_token
from parallel.activation_checkpoint import apply_ac, get_recompute_flops_per_token, get_selective_policy
from torch.utils.checkpoint import CheckpointPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=96, dim=32, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32)
    return ModelConfig(**{**base, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    return model


def batch(cfg: ModelConfig, size: int = 3, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, cfg.vocab_size, (size, seq + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def loss_and_grads(model: nn.Module, inputs, targets, *, fused_loss: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    if fused_loss:
        loss = model(inputs, targets=targets)
    else:
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_elements", [96 * 4, 96 * 5, 2**29])  # chunks of 4 tokens, of 4 (uneven end), one
def test_fused_loss_equals_cross_entropy_of_logits(monkeypatch, chunk_elements):
    monkeypatch.setattr(models.loss, "CHUNK_ELEMENTS", chunk_elements)
    cfg = tiny()
    model = build(cfg)
    inputs, targets = batch(cfg, seq=15)  # 45 tokens: the last chunk is partial
    fused_loss, fused_grads = loss_and_grads(model, inputs, targets, fused_loss=True)
    plain_loss, plain_grads = loss_and_grads(model, inputs, targets, fused_loss=False)
    assert abs(fused_loss - plain_loss) < 1e-6
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_fused_loss_under_autocast_computes_in_bf16_and_returns_fp32_grads():
    cfg = tiny()
    model = build(cfg)
    inputs, targets = batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs, targets=targets)
    loss.backward()
    reference = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 2e-2
    assert model.output.weight.grad.dtype == torch.float32


def test_fused_loss_scales_with_upstream_gradient():
    cfg = tiny()
    model = build(cfg)
    inputs, targets = batch(cfg)
    _, grads = loss_and_grads(model, inputs, targets, fused_loss=True)
    model.zero_grad()
    (model(inputs, targets=targets) * 3.0).backward()
    torch.testing.assert_close(model.output.weight.grad, 3.0 * grads["output.weight"])


def test_residual_stream_runs_in_the_autocast_dtype():
    cfg = tiny()
    model = build(cfg)
    inputs, _ = batch(cfg)
    seen = []
    model.layers["0"].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs)
    model(inputs)
    assert seen == [torch.bfloat16, torch.float32]


# ---------------------------------------------------------------------------------------------
# fp8: which modules torchao converts (on meta: no fp8 kernels needed to check the selection).


def test_fp8_converts_large_block_linears_only():
    from parallel.float8 import apply_float8, describe_converted

    cfg = tiny(vocab_size=2048, dim=1024, num_layers=2, num_heads=8, num_kv_heads=2, ffn_dim=2048)
    with torch.device("meta"):
        model = Transformer(cfg)
    converted = apply_float8(model, recipe="tensorwise", fsdp_all_gather=False)
    expected = [f"layers.{i}.{name}" for i in range(2)
                for name in ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    assert sorted(converted) == sorted(expected)  # wk/wv (256 wide) and the output layer stay bf16
    assert describe_converted(converted) == (
        "layers.{0..1}.{attention.wo, attention.wq, feed_forward.w1, feed_forward.w2, feed_forward.w3}")
    from torchao.float8.float8_linear import Float8Linear

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert isinstance(module, Float8Linear) == (name in expected), name


def test_fp8_output_and_fast_accum_are_opt_in():
    from torchao.float8.float8_linear import Float8Linear

    from parallel.float8 import apply_float8

    cfg = tiny(vocab_size=2048, dim=1024, num_layers=1, num_heads=8, num_kv_heads=2, ffn_dim=2048)
    models = {}
    for opt_in in (False, True):
        with torch.device("meta"):
            models[opt_in] = Transformer(cfg)
        converted = apply_float8(models[opt_in], recipe="tensorwise", fsdp_all_gather=False, output=opt_in,
                                 fast_accum=opt_in)
        assert ("output" in converted) == opt_in == isinstance(models[opt_in].output, Float8Linear)
    for opt_in, model in models.items():
        config = model.layers["0"].attention.wq.config
        assert config.gemm_config_output.use_fast_accum  # the recipe's forward always has it
        assert config.gemm_config_grad_input.use_fast_accum == config.gemm_config_grad_weight.use_fast_accum == opt_in


def test_compile_covers_the_output_layer_only_when_asked():
    from parallel.compile import apply_compile

    for output in (False, True):
        model = build(tiny())
        apply_compile(model, output=output)
        assert all(block._compiled_call_impl is not None for block in model.layers.values())
        assert (model.output._compiled_call_impl is not None) == output


def test_fp8_leaves_small_models_alone():
    from parallel.float8 import apply_float8

    with torch.device("meta"):
        model = Transformer(tiny())
    assert apply_float8(model, recipe="rowwise", fsdp_all_gather=False) == []
    from torchao.float8.float8_linear import Float8Linear

    assert not any(isinstance(m, Float8Linear) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("mode,every,wrapped", [("full", 1, ["0", "1", "2", "3"]), ("selective", 2, ["0", "2"]),
                                               ("none", 1, [])])
def test_ac_wraps_every_kth_block_and_keeps_numerics(mode, every, wrapped):
    cfg = tiny()
    reference = build(cfg)
    model = copy.deepcopy(reference)
    apply_ac(model, mode, every)
    is_wrapped = [name for name, block in model.layers.items() if type(block).__name__ == "CheckpointWrapper"]
    assert is_wrapped == wrapped
    inputs, targets = batch(cfg)
    expected = loss_and_grads(reference, inputs, targets, fused_loss=True)
    got = loss_and_grads(model, inputs, targets, fused_loss=True)
    assert got[0] == expected[0]
    clean = {name.replace("._checkpoint_wrapped_module", ""): g for name, g in got[1].items()}
    for name, grad in expected[1].items():
        torch.testing.assert_close(clean[name], grad, atol=0, rtol=0, msg=name)


class FakeContext:
    def __init__(self, is_recompute: bool):
        self.is_recompute = is_recompute


def test_selective_policy_saves_attention_and_every_other_matmul():
    policy = get_selective_policy()
    aten = torch.ops.aten
    ops = [aten.mm.default, aten._scaled_dot_product_flash_attention_for_cpu.default, aten.mm.default,
           aten.mm.default, aten.silu.default, aten.mm.default]
    save = CheckpointPolicy.MUST_SAVE
    forward = [policy(FakeContext(False), op) == save for op in ops]
    assert forward == [True, True, False, True, False, False]
    recompute = [policy(FakeContext(True), op) == save for op in ops]
    assert recompute == forward  # counted apart, so the recompute pass makes the same choices


# ---------------------------------------------------------------------------------------------
# Compile


def test_compiled_block_matches_eager():
    torch._dynamo.reset()
    cfg = tiny(num_layers=1)
    model = build(cfg)
    inputs, targets = batch(cfg)
    expected = loss_and_grads(model, inputs, targets, fused_loss=True)
    compiled = copy.deepcopy(model)
    from parallel.compile import apply_compile

    apply_compile(compiled)
    got = loss_and_grads(compiled, inputs, targets, fused_loss=True)
    assert abs(got[0] - expected[0]) < 1e-5
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# Accounting


LLAMA_1B = ModelConfig(vocab_size=100352, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_dim=8192,
                       rope_theta=500000.0)


def test_mfu_arithmetic_on_the_reference_shape():
    from trainer.bench import summarize
    from trainer.config import load_config

    assert flops_per_token(LLAMA_1B, 2048) == 7_877_308_416  # the reference's 7.877e9
    cfg = load_config(["recipe=bench_1b", "run.device=cpu", "log.peak_tflops=989"])
    tokens_per_step = 8 * 2048
    # 40 steps in 10 s: 65,536 tokens/s; MFU = 65,536 x 7.877e9 / 989e12 = 52.2 %.
    records = [{"step": 20, "loss": 1.0, "time_s": 5.0, "mem_gb": 1.0}, {"step": 60, "loss": 1.0, "time_s": 15.0, "mem_gb": 2.0}]
    result = summarize(cfg, records, warmup=20)
    assert result["tokens_per_s"] == 40 * tokens_per_step // 10
    assert result["mfu"] == round(65_536 * 7_877_308_416 / 989e12, 4) == 0.522
    assert result["hfu"] == result["mfu"]  # no recomputation


def test_hfu_counts_recomputation():
    seq = 2048
    full = get_recompute_flops_per_token(LLAMA_1B, seq, "full")
    selective = get_recompute_flops_per_token(LLAMA_1B, seq, "selective")
    model_flops = flops_per_token(LLAMA_1B, seq)
    # Full recomputation repeats the blocks' forward: a third of their training FLOPs (norm weights aside).
    output_layer = 6 * LLAMA_1B.vocab_size * LLAMA_1B.dim
    norms = 6 * LLAMA_1B.dim * (2 * LLAMA_1B.num_layers + 1)
    assert full == (model_flops - output_layer - norms) / 3
    assert 0 < selective < full / 2
    assert get_recompute_flops_per_token(LLAMA_1B, seq, "full", every=2) == full / 2
    assert get_recompute_flops_per_token(LLAMA_1B, seq, "none") == 0


@pytest.mark.parametrize("recipe,expected", [("tensorwise", True), ("rowwise", False)])
def test_fp8_fsdp_all_gather_follows_the_recipe(recipe, expected):
    from parallel.float8 import apply_float8

    cfg = tiny(vocab_size=2048, dim=1024, num_layers=1, num_heads=8, num_kv_heads=8, ffn_dim=2048)
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_float8(model, recipe=recipe, fsdp_all_gather=True)
    assert model.layers["0"].attention.wq.config.enable_fsdp_float8_all_gather is expected


@pytest.mark.parametrize("argv, said", [
    (["warmup=abc"], "error: warmup='abc': must be an integer"),
    (["warmup=50", "train.steps=4"], "error: warmup=50: must be in [1, train.steps=4)"),
    (["warmup=-1"], "error: warmup=-1: must be in [1, train.steps=20)"),
    (["warmup=3"], "error: warmup=3: not a multiple of log.every=5"),  # debug logs every 5 steps
])
def test_bench_refuses_a_bad_warmup_before_training(argv, said, tmp_path, monkeypatch, capsys):
    import trainer.train
    from trainer import bench

    trained = []
    monkeypatch.setattr(trainer.train, "train", lambda cfg: trained.append(cfg) or {"loss": 1.0})
    run_dir = tmp_path / "run"
    assert bench.main(["recipe=debug", f"run.dir={run_dir}", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1, err
    assert not trained and not run_dir.exists()


def test_bench_writes_no_record_when_nothing_was_left_to_train(tmp_path, monkeypatch, capsys):
    """A rerun in a finished run dir trains nothing (train returns no loss): the old metrics are not measured again."""
    import json

    import trainer.train
    from trainer import bench

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0, "time_s": 0.1 * s, "mem_gb": 0.1}) + "\n" for s in (5, 10, 15, 20)))
    argv = ["recipe=debug", f"run.dir={run_dir}", "warmup=10"]
    monkeypatch.setattr(trainer.train, "train", lambda cfg: {})
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing left to train" in err and err.count("\n") == 1, err
    assert not (run_dir / "bench.jsonl").exists()
    monkeypatch.setattr(trainer.train, "train", lambda cfg: {"loss": 5.0})  # the same records, freshly trained
    assert bench.main(argv) == 0
    assert len((run_dir / "bench.jsonl").read_text().splitlines()) == 1
    assert bench.main(["--help"]) == 0 and "warmup" in capsys.readouterr().out


def test_bench_refuses_to_time_across_a_resume(tmp_path, capsys):
    """Each run's metrics clock starts at its own launch: steps 1-10 come from one run, 11-20 from the resumed one."""
    import json

    from trainer import bench
    from trainer.config import load_config
    from trainer.train import train

    run_dir = tmp_path / "run"
    common = ["recipe=debug", f"run.dir={run_dir}", "checkpoint.enabled=true", "checkpoint.every=10", "train.val_every=100"]
    train(load_config([*common, "train.steps=10"]))
    capsys.readouterr()
    assert bench.main([*common, "warmup=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: warmup=5: the run resumes from step 10") and err.count("\n") == 1, err
    assert not (run_dir / "bench.jsonl").exists()
    assert bench.main([*common, "warmup=15"]) == 0
    record = json.loads((run_dir / "bench.jsonl").read_text())
    assert record["steps"] == "16-20" and record["tokens_per_s"] > 0
    # Loaded from another run's checkpoint, a fresh run.dir would not help: the message names checkpoint.load.
    other = ["recipe=debug", f"run.dir={tmp_path / 'other'}", f"checkpoint.load={run_dir}", "train.val_every=100"]
    assert bench.main([*other, "warmup=5"]) == 2
    assert "give no checkpoint.load or warmup above 20" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_fp8_output_layer_trains_end_to_end_on_cpu(tmp_path, capsys):
    """torchao's float8 linears run on CPU too: the output layer converts (the log says so) and the loss tracks bf16."""
    import json

    from trainer.config import load_config
    from trainer.train import train

    # dim and vocab at MIN_FP8_DIM so both the block linears and the output layer qualify
    shape = ["model.dim=1024", "model.num_layers=1", "model.num_heads=8", "model.num_kv_heads=8", "model.ffn_dim=1024",
             "model.vocab_size=1024", "train.seq_len=32", "train.global_batch_size=2", "train.micro_batch_size=2",
             "train.steps=3", "log.every=1", "train.val_batches=0", "checkpoint.enabled=false", "data=synthetic"]
    losses = {}
    for name, extra in (("bf16", ["train.precision=bf16"]),
                        ("fp8", ["train.precision=fp8", "train.fp8_output=true"])):
        run_dir = tmp_path / name
        train(load_config(["recipe=debug", *shape, *extra, f"run.dir={run_dir}"]))
        losses[name] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    log = capsys.readouterr().out
    assert ("fp8 (tensorwise): 8 linears converted: layers.{0}.{attention.wk, attention.wo, attention.wq, attention.wv, "
            "feed_forward.w1, feed_forward.w2, feed_forward.w3}, output; the rest stay bf16") in log, log
    assert len(losses["fp8"]) == 3 and all(math.isfinite(loss) for loss in losses["fp8"]), losses


def test_fp8_output_layer_gradient_tracks_bf16():
    """One backward through a float8 output layer gives the bf16 layer's gradients up to float8 rounding (cosine
    0.996 measured)."""
    from parallel.float8 import apply_float8

    cfg = tiny(vocab_size=1024, dim=1024, num_layers=1, num_heads=8, num_kv_heads=8, ffn_dim=1024)
    reference = build(cfg)
    fp8 = copy.deepcopy(reference)
    assert "output" in apply_float8(fp8, recipe="tensorwise", fsdp_all_gather=False, output=True)
    inputs, targets = batch(cfg)
    grads = {}
    for name, model in (("bf16", reference), ("fp8", fp8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten()).backward()
        grads[name] = {n: model.get_parameter(n).grad.flatten().float() for n in ("output.weight", "norm.weight")}
    for n, bf16 in grads["bf16"].items():
        fp8_grad = grads["fp8"][n]
        cosine = F.cosine_similarity(bf16, fp8_grad, dim=0).item()
        assert 0.99 < cosine and not torch.equal(bf16, fp8_grad), (n, cosine)  # close, and not the bf16 path
