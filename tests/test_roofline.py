"""Roofline report: kernel classes and bounds against given roofs, FLOPs against the model's count, the
diagnosis of injected slowdowns and of each signature's threshold, time shares adding up to the step, the report and trace files, and a
synthetic GPU trace for the device-timeline rules (overlap, idle after syncs, data gaps)."""
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from models import count_params, flops_per_token
from trainer.config import ConfigError, load_config
from trainer.kernel_costs import OptimizerWork, get_optimizer_work
from trainer.roofline import diagnose, get_plot_points
from trainer.roofline import main as roofline_main
from trainer.roofs import Roofs, get_device_name, get_roofs
from trainer.trace_analysis import CLASSES, analyze_trace, classify

ROOT = Path(__file__).resolve().parent.parent
RUN = ["recipe=debug", "profile.start_step=2", "profile.steps=3", "checkpoint.enabled=false", "train.val_batches=0",
       "log.progress=lines", "log.every=6"]
# Roofs given to the runs (a calibration on a shared 2-core machine is noise): ridge 5 FLOP/B in fp32.
GIVEN_ROOFS = {"peak_tflops": {"fp32": 0.1, "bf16": 0.4}, "bandwidth_tbps": 0.02}


def write_roofs(path, roofs=GIVEN_ROOFS):
    path.write_text(json.dumps({get_device_name(torch.device("cpu")): roofs}))
    return path


def run_report(tmp_path, *overrides) -> dict:
    from trainer.train import train

    cache = write_roofs(tmp_path / "roofs.json")
    cfg = load_config([*RUN, f"run.dir={tmp_path / 'run'}", f"profile.roofs_cache={cache}", "profile.roofline=true",
                       "train.steps=6", *overrides])
    train(cfg)
    return json.loads((tmp_path / "run" / "roofline" / "roofline.json").read_text())


@pytest.fixture(scope="module")
def clean(tmp_path_factory, one_thread):
    """One clean debug run through the CLI shortcut, with the trace on too."""
    tmp_path = tmp_path_factory.mktemp("clean")
    cache = write_roofs(tmp_path / "roofs.json")
    assert roofline_main([*RUN, f"run.dir={tmp_path / 'run'}", f"profile.roofs_cache={cache}", "profile.trace=true"]) == 0
    return tmp_path / "run", json.loads((tmp_path / "run" / "roofline" / "roofline.json").read_text())


def test_matmul_compute_bound_add_memory_bound(tmp_path, one_thread):
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x, y = torch.randn(2**20), torch.randn(2**20)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("ProfilerStep#1"):
            torch.mm(a, b)
            torch.add(x, y)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    roofs = Roofs("given", {"fp32": 1.0}, bandwidth_tbps=0.1)  # ridge at 10 FLOP/byte
    classes = analyze_trace(json.loads((tmp_path / "trace.json").read_text()), roofs=roofs)["classes"]
    matmul, elementwise = classes["matmul"], classes["norm/elementwise"]
    assert matmul["gflop"] == pytest.approx(2 * 256**3 / 1e9)
    assert matmul["intensity"] == pytest.approx(2 * 256**3 / (3 * 256**2 * 4))  # A + B + C in fp32
    assert matmul["bound"] == "compute" and matmul["roof_tflops"] == pytest.approx(1.0)
    assert elementwise["intensity"] == pytest.approx(1 / 12)  # one add per 2 reads + 1 write of 4 bytes
    assert elementwise["bound"] == "memory" and elementwise["roof_tflops"] == pytest.approx(0.1 / 12)


def test_clean_run_report_files_and_window(clean):
    run_dir, report = clean
    for name in ("roofline.md", "roofline.json", "roofline.png"):
        assert (run_dir / "roofline" / name).stat().st_size > 0, name
    with gzip.open(run_dir / "profile" / "trace_rank0.json.gz", "rt") as f:
        assert any(e.get("name") == "ProfilerStep#3" for e in json.load(f)["traceEvents"])
    # The shortcut ran start_step + steps + 1 steps and profiled steps 3-5.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6 and report["steps"] == "3-5"
    md = (run_dir / "roofline" / "roofline.md").read_text()
    assert "| matmul |" in md and "## Top kernels" in md


def test_top_kernels_are_the_heaviest_of_their_class(clean):
    """On CPU the kernels are aten ops by self time: the linears' matmuls lead their class, and no class's top
    kernels own more than the class."""
    analysis = clean[1]["analysis"]
    top = analysis["top_kernels"]
    assert top["matmul"][0]["name"] in ("aten::mm", "aten::addmm", "aten::bmm")
    for cls, rows in top.items():
        times = [r["time_ms"] for r in rows]
        assert times == sorted(times, reverse=True) and len(rows) <= 5
        assert sum(times) <= analysis["classes"][cls]["time_ms"] * (1 + 1e-9)
        assert sum(r["class_share"] for r in rows) <= 1 + 1e-9
        assert all(r["calls_per_step"] > 0 for r in rows)


def test_time_shares_add_up_to_the_step(clean):
    _, report = clean
    analysis = report["analysis"]
    assert abs(report["sum_ms"] - report["measured_step_ms"]) <= 0.05 * report["measured_step_ms"], report
    shares = sum(c["share"] for c in analysis["classes"].values()) + sum(i["share"] for i in analysis["idle"].values())
    assert shares == pytest.approx(1.0, abs=0.01)
    assert analysis["busy_ms"] > 0 and analysis["classes"]["matmul"]["time_ms"] > 0


def test_flops_match_the_model_count(clean):
    """Counted from shapes: matmuls (forward 2N, backward 4N over every linear incl. the output layer) and
    attention over the full square. flops_per_token = 6N + 12 L d seq differs in two known ways: its 6N
    counts the RMSNorm weights, which do no matmul, and its attention has no backward score recompute,
    which the counted figure has (forward 4, backward 10 x L d seq per token instead of 12 in all)."""
    _, report = clean
    cfg = load_config(["recipe=debug"])
    m, seq = cfg.model, cfg.train.seq_len
    tokens = cfg.train.global_batch_size * seq
    norm_weights = (2 * m.num_layers + 1) * m.dim
    expected = (6 * (count_params(m, embedding=False) - norm_weights) + 14 * m.num_layers * m.dim * seq) * tokens
    counted = report["analysis"]["flops_per_step"]["matmul_attention"]
    assert counted == pytest.approx(expected, rel=1e-6)
    assert flops_per_token(m, seq) * tokens == report["model_flops_per_step"]
    assert counted == pytest.approx(report["model_flops_per_step"], rel=0.03)  # +2.1% for the debug shape


def test_optimizer_bytes_come_from_the_parameters(clean):
    """Fused AdamW reads param, grad, exp_avg, exp_avg_sq and writes three back: 7 x 4 bytes per fp32
    parameter; the gradient norm reads each grad and clipping (optim.grad_clip > 0) reads and writes it."""
    run_dir, report = clean
    cfg = load_config(["recipe=debug"])
    assert cfg.optim.grad_clip > 0
    params = count_params(cfg.model)
    estimate, optimizer = report["analysis"]["optimizer_estimate"], report["analysis"]["classes"]["optimizer"]
    assert estimate["adamw"]["gbyte"] * 1e9 == pytest.approx(7 * 4 * params, rel=0.01)
    assert optimizer["gbyte"] * 1e9 == pytest.approx((7 + 1 + 2) * 4 * params, rel=0.01)
    assert optimizer["roof_fraction"] > 0 and optimizer["bound"] == "memory"
    assert "optimizer" in get_plot_points(report)  # on the PNG, named in its legend
    assert "optimizer FLOPs and bytes estimated" in (run_dir / "roofline" / "roofline.md").read_text()


def test_optimizer_of_a_1b_model_against_the_h200_roof():
    """The H200 bench_1b report's optimizer row: 16.16 ms of multi_tensor_apply kernels per step,
    no shapes recorded, 1.384e9 fp32 parameters (meta: no memory), a 4.08 TB/s roof."""
    params = [torch.nn.Parameter(torch.empty(n, device="meta")) for n in (1_000_000_000, 384_187_904)]
    work = get_optimizer_work(torch.optim.AdamW(params), grad_clip=True)
    assert work.bytes == pytest.approx({"adamw": 7 * 4 * 1_384_187_904, "grad_norm": 4 * 1_384_187_904,
                                        "grad_scale": 2 * 4 * 1_384_187_904})
    step = {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 16_160, "tid": 1, "args": {}}
    kernel = {"ph": "X", "cat": "kernel", "name": "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
              "ts": 0, "dur": 16_160, "tid": 7, "args": {}}
    roofs = Roofs("NVIDIA H200", {"fp32": 50.92, "bf16": 764.0}, bandwidth_tbps=4.08)

    def optimizer_row(work):
        return analyze_trace({"traceEvents": [step, kernel]}, roofs=roofs, optimizer_work=work)["classes"]["optimizer"]

    adamw = optimizer_row(OptimizerWork({"adamw": work.flops["adamw"]}, {"adamw": work.bytes["adamw"]},
                                        {"fp32": work.flops["adamw"]}))
    assert adamw["gbyte"] == pytest.approx(38.76, rel=1e-3) and adamw["gflop"] == pytest.approx(15 * 1.384, rel=1e-3)
    assert adamw["tbps"] == pytest.approx(2.40, rel=0.01) and adamw["roof_fraction"] == pytest.approx(0.588, rel=0.01)
    with_clipping = optimizer_row(work)  # the run's class: its kernels include the gradient norm and clipping
    assert with_clipping["gbyte"] == pytest.approx(55.37, rel=1e-3) and with_clipping["bound"] == "memory"
    assert with_clipping["roof_fraction"] == pytest.approx(0.839, rel=0.01)


def test_clean_run_has_neither_data_loading_nor_host_sync(clean):
    _, report = clean
    text = " ".join(report["diagnosis"])
    assert "data loading" not in text and "host sync" not in text, report["diagnosis"]
    assert report["analysis"]["syncs_in_train_step_per_step"] == 0


def test_injected_data_delay_is_diagnosed_as_data_loading(tmp_path, monkeypatch, one_thread):
    from trainer.data import SampleStream

    next_batch = SampleStream.next_batch

    def slow_next_batch(self, *args, **kwargs):
        time.sleep(0.05)
        return next_batch(self, *args, **kwargs)

    monkeypatch.setattr(SampleStream, "next_batch", slow_next_batch)
    report = run_report(tmp_path)
    assert any(line.startswith("data loading") for line in report["diagnosis"]), report["diagnosis"]
    assert report["analysis"]["idle"]["data_loading"]["time_ms"] >= 45
    assert not any(line.startswith("host sync") for line in report["diagnosis"])


def test_injected_item_in_forward_is_diagnosed_as_host_sync(tmp_path, monkeypatch, one_thread):
    from models.llama import FeedForward

    forward = FeedForward.forward

    def forward_with_item(self, x):
        x.detach().abs().max().item()  # a device-to-host read in the hot path
        return forward(self, x)

    monkeypatch.setattr(FeedForward, "forward", forward_with_item)
    report = run_report(tmp_path)
    assert any(line.startswith("host sync") for line in report["diagnosis"]), report["diagnosis"]
    # 2 blocks x 2 micro-batches per step
    assert report["analysis"]["syncs_in_train_step_per_step"] == 4
    assert not any(line.startswith("data loading") for line in report["diagnosis"])


def neutral_analysis() -> dict:
    """An analysis with no signature: no idle, few long kernels, no class past its threshold."""
    return {"classes": {c: {"share": 0.0, "roof_fraction": None, "tflops": None, "roof_tflops": None, "bound": None}
                        for c in CLASSES},
            "idle": {k: {"share": 0.0} for k in ("data_loading", "host_sync", "host_other")},
            "syncs_in_train_step_per_step": 0, "kernels": {"per_step": 10, "median_us": 100.0},
            "htod": {"per_step": 0, "time_ms": 0.0, "pageable": False}, "window_ms": 10.0,
            "communication": {"exposed_ms": 0.0, "total_ms": 0.0}, "top_kernels": {}}


GPU_SETTINGS = {"device": "cuda", "compile": False, "precision": "bf16", "fused_loss": False, "optim_fused": False,
                "optim_compile": False}


@pytest.mark.parametrize("signature, key, inject", [
    ("data loading", "data.synthetic=true", lambda a: a["idle"]["data_loading"].update(share=0.2)),
    ("host sync", "log.every", lambda a: a.update(syncs_in_train_step_per_step=2)),
    ("host overhead", "train.compile=true", lambda a: a["idle"]["host_other"].update(share=0.2)),
    ("many tiny kernels", "train.compile=true", lambda a: a["kernels"].update(per_step=2000, median_us=4.0)),
    ("host-to-device copies", "non_blocking=True", lambda a: a["htod"].update(per_step=2, time_ms=0.5, pageable=True)),
    ("communication not overlapped", "parallel.zero=2", lambda a: a["classes"]["communication"].update(share=0.3)),
    ("matmuls at 20% of their roof", "train.precision=fp8", lambda a: a["classes"]["matmul"].update(
        share=0.6, roof_fraction=0.2, tflops=100.0, roof_tflops=500.0)),
    ("memory-bound norm/elementwise", "train.compile=true",
     lambda a: a["classes"]["norm/elementwise"].update(share=0.3, bound="memory")),
    ("loss is 20%", "train.fused_loss=true", lambda a: a["classes"]["loss"].update(share=0.2)),
    ("optimizer is 20%", "optim.fused=true", lambda a: a["classes"]["optimizer"].update(share=0.2)),
])
def test_each_signature_is_diagnosed_naming_its_key(signature, key, inject):
    analysis = neutral_analysis()
    assert diagnose(analysis, GPU_SETTINGS)[0].startswith("no classic signature")
    inject(analysis)
    lines = diagnose(analysis, GPU_SETTINGS)
    assert len(lines) == 1 and lines[0].startswith(signature) and key in lines[0], lines


def test_compiled_elementwise_diagnosis_names_the_heaviest_kernel():
    analysis = neutral_analysis()
    analysis["classes"]["norm/elementwise"].update(share=0.3, bound="memory")
    analysis["top_kernels"] = {"norm/elementwise": [
        {"name": "triton_red_fused_abs_amax_0", "time_ms": 12.5, "calls_per_step": 64, "class_share": 0.4}]}
    (line,) = diagnose(analysis, {**GPU_SETTINGS, "compile": True})
    assert "already compiled" in line and "triton_red_fused_abs_amax_0 at 12.5 ms/step" in line


def test_optimizer_diagnosis_goes_fused_then_compiled_then_batch():
    analysis = neutral_analysis()
    analysis["classes"]["optimizer"].update(share=0.2)
    steps = [{}, {"optim_fused": True}, {"optim_fused": True, "optim_compile": True}]
    fixes = [diagnose(analysis, {**GPU_SETTINGS, **setting})[0] for setting in steps]
    assert "optim.fused=true" in fixes[0] and "optim.compile=true" in fixes[1] and "global_batch_size" in fixes[2]


def test_diagnosis_is_strongest_first():
    analysis = neutral_analysis()
    analysis["idle"]["data_loading"]["share"] = 0.15
    analysis["classes"]["loss"]["share"] = 0.4
    assert [line.split(" ")[0] for line in diagnose(analysis, GPU_SETTINGS)] == ["loss", "data"]


def test_shortcut_profiles_in_a_run_dir_of_its_own():
    """The shortcut never resumes, saves into or rewrites the logs of the recipe's training run dir."""
    from trainer.roofline import get_overrides

    cfg = load_config(get_overrides(["recipe=debug"]))
    assert cfg.run.dir == load_config(["recipe=debug"]).run.dir + "_roofline"
    assert not cfg.checkpoint.enabled and cfg.train.steps == cfg.profile.start_step + cfg.profile.steps + 1
    given = load_config(get_overrides(["recipe=debug", "run.dir=runs/mine", "checkpoint.enabled=true", "train.steps=40"]))
    assert (given.run.dir, given.checkpoint.enabled, given.train.steps) == ("runs/mine", True, 40)


def test_window_beyond_the_run_is_refused():
    with pytest.raises(ConfigError, match="profile.start_step"):
        load_config(["recipe=debug", "train.steps=5", "profile.trace=true"])
    load_config(["recipe=debug", "train.steps=5"])  # window unused: no check


def test_roofs_come_from_the_cache(tmp_path, monkeypatch):
    import trainer.roofs as roofs_module

    cache = write_roofs(tmp_path / "roofs.json")
    monkeypatch.setattr(roofs_module, "measure_roofs", lambda device: pytest.fail("calibrated despite the cache"))
    roofs = get_roofs(torch.device("cpu"), cache, log=lambda *_: None)
    assert roofs.peak("fp32") == 0.1 and roofs.ridge("fp32") == pytest.approx(5.0) and roofs.peak("fp8") == 0.4
    measured = Roofs("x", {"fp32": 2.0}, 1.0)
    monkeypatch.setattr(roofs_module, "measure_roofs", lambda device: measured)
    assert get_roofs(torch.device("cpu"), tmp_path / "new.json", log=lambda *_: None) is measured
    cached = json.loads((tmp_path / "new.json").read_text())[get_device_name(torch.device("cpu"))]
    assert cached["peak_tflops"] == {"fp32": 2.0}


@pytest.mark.parametrize("name, context, memcpy, expected", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", (), False, "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", (), False, "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", (), False, "matmul"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", (), False, "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", (), False, "attention"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", (), False, "norm/elementwise"),
    ("triton_per_fused__log_softmax_backward_data_nll_loss_backward_1", (), False, "loss"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::exp_kernel>", ("loss",), False, "loss"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", (), False, "communication"),
    ("Memcpy HtoD (Pageable -> Device)", (), True, "memory copies"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>", (), False, "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", ("optimizer",), False, "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", (), False, "norm/elementwise"),
    ("void at::native::indexSelectLargeIndex<float, long>", (), False, "other"),
])
def test_kernel_classes(name, context, memcpy, expected):
    assert classify(name, frozenset(context), device=True, memcpy=memcpy) == expected


def test_device_timeline_rules_on_a_synthetic_gpu_trace():
    """One step of 1000 us: data until 100, a gemm 150-450 under which a collective runs 300-600, a
    .item() whose sync returns at 690, a second gemm 750-850."""
    def cpu(name, ts, dur, tid=1, cat="cpu_op", **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}

    def kernel(name, ts, dur, correlation, stream=7):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": stream, "pid": 0,
                "args": {"correlation": correlation, "stream": stream}}

    mm = {"Input Dims": [[1024, 1024], [1024, 1024]], "Input type": ["c10::BFloat16"] * 2}
    events = [
        cpu("ProfilerStep#1", 0, 1000, cat="user_annotation"),
        cpu("next_batch", 0, 100, cat="user_annotation"),
        cpu("train_step", 100, 880, cat="user_annotation"),
        cpu("aten::mm", 110, 10, **mm), cpu("cudaLaunchKernel", 112, 6, cat="cuda_runtime", correlation=11),
        cpu("c10d::allreduce_", 130, 10), cpu("cudaLaunchKernel", 132, 6, cat="cuda_runtime", correlation=12),
        cpu("aten::item", 500, 200), cpu("aten::_local_scalar_dense", 501, 198),
        cpu("cudaStreamSynchronize", 510, 180, cat="cuda_runtime"),
        cpu("aten::mm", 700, 10, **mm), cpu("cudaLaunchKernel", 702, 6, cat="cuda_runtime", correlation=13),
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 150, 300, 11),
        kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 300, 300, 12, stream=20),
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 750, 100, 13),
    ]
    roofs = Roofs("given", {"bf16": 1000.0}, bandwidth_tbps=4.0)
    a = analyze_trace({"traceEvents": events}, roofs=roofs)
    assert a["mode"] == "cuda" and a["window_ms"] == pytest.approx(1.0)
    assert a["classes"]["matmul"]["time_ms"] == pytest.approx(0.4)
    assert a["communication"] == {"total_ms": pytest.approx(0.3), "exposed_ms": pytest.approx(0.15)}
    assert a["idle"]["data_loading"]["time_ms"] == pytest.approx(0.1)
    assert a["idle"]["host_sync"]["time_ms"] == pytest.approx(0.15)  # 600-750, after the sync returned at 690
    assert a["idle"]["host_other"]["time_ms"] == pytest.approx(0.2)  # 100-150 and 850-1000
    assert a["sum_ms"] == pytest.approx(1.0)
    assert a["syncs_in_train_step_per_step"] == 1
    assert a["classes"]["matmul"]["gflop"] == pytest.approx(2 * 2 * 1024**3 / 1e9)
    assert a["classes"]["matmul"]["flops_by_dtype"] == {"bf16": 1.0}
    assert a["classes"]["matmul"]["tflops"] == pytest.approx(2 * 2 * 1024**3 / 400e-6 / 1e12)
    (gemm,) = a["top_kernels"]["matmul"]
    assert gemm == {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "time_ms": pytest.approx(0.4), "calls_per_step": 2,
                    "class_share": pytest.approx(1.0)}
    assert a["top_kernels"]["communication"][0]["time_ms"] == pytest.approx(0.15)  # the exposed part only


def test_two_processes_rank0_reports_with_a_straggler_line(tmp_path, one_thread):
    """FSDP over 2 gloo processes: each rank profiles itself, rank 0 writes the report for both."""
    cache = write_roofs(tmp_path / "roofs.json")  # keyed "(1 threads)": the workers run one thread each too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.roofline",
         *RUN, f"run.dir={tmp_path / 'run'}", f"profile.roofs_cache={cache}", "parallel.dp_shard=2", "profile.trace=true"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibrating" not in result.stdout  # the given roofs were found
    report = json.loads((tmp_path / "run" / "roofline" / "roofline.json").read_text())
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and report["world_size"] == 2
    assert report["straggler"].startswith("straggler: slowest rank")
    assert all(r["step_ms"] > 0 and r["busy_ms"] > 0 for r in report["ranks"])
    assert (tmp_path / "run" / "profile" / "trace_rank1.json.gz").is_file()
    assert report["analysis"]["classes"]["communication"]["time_ms"] > 0  # gloo collectives seen on CPU
    md = (tmp_path / "run" / "roofline" / "roofline.md").read_text()
    assert "| matmul |" in md and "## Ranks" in md and "\n| 1 | " in md, md


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2", "model.num_layers=4"]], ids=["tp2", "pp2"])
def test_sharded_flops_and_pipeline_waits_are_accounted(layout, tmp_path, one_thread):
    """Under TP a DTensor op sees global shapes and dispatches to a local op: the local one is counted (once counted
    at the global size, +88 %). gloo's waits are annotations, not ops: a pipeline's wait is communication, not host
    overhead (once 75 % host overhead; not compared by time here: timings on 2 shared cores vary)."""
    cache = write_roofs(tmp_path / "roofs.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.roofline",
         *RUN, f"run.dir={tmp_path / 'run'}", f"profile.roofs_cache={cache}", *layout],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "roofline" / "roofline.json").read_text())
    analysis = report["analysis"]
    if layout[0] == "parallel.tp=2":
        counted = analysis["flops_per_step"]["matmul_attention"]
        assert counted == pytest.approx(report["model_flops_per_step"], rel=0.03), (counted, report["model_flops_per_step"])
    else:
        # gloo's waits (profiler annotations) are communication: among its heaviest entries, whatever their timing
        names = [k["name"] for k in analysis["top_kernels"]["communication"]]
        assert any(name.startswith("gloo:") for name in names), names
