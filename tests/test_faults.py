"""Fault tolerance: non-finite steps (skip, stop with the module named; host and on-device skipping), preemption by
SIGTERM/SIGUSR1 (one process, and SIGTERM to torchrun with two processes through launch/train.sh), kill -9 under torchrun
--max-restarts, the hang watchdog, a crash inside a checkpoint save, and the launch scripts (multi-node refusal,
two "nodes" on localhost, the SLURM template's rendezvous endpoint with fake SLURM commands).

Every interrupted run is compared with one uninterrupted in-process run of the same recipe: the losses after a
resume equal its losses (fp tolerance 1e-5: the two-process runs use FSDP, the reference one process).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from distributed import listen_ports

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
BASE = ["recipe=debug", f"train.steps={STEPS}", "log.every=1", "log.progress=lines", "run.device=cpu",
        "train.val_batches=0", "checkpoint.every=4", f"data.cache_dir={ROOT / '.cache' / 'ridgeline'}"]
TWO = ["parallel.dp_shard=2"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; after a resume the later lines win."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def train_here(overrides: list[str]) -> None:
    """One run in this process (callers hold the `one_thread` fixture)."""
    from trainer.config import load_config
    from trainer.train import train

    train(load_config(BASE + overrides))


def run(command: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def signal_after(command: list[str], line_start: str, sig: signal.Signals, timeout: float = 180) -> tuple[int, str]:
    """Start `command`, send `sig` to it once a stdout line starts with `line_start`; (exit code, all output)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    output, sent = [], False
    try:
        for line in proc.stdout:
            output.append(line)
            if not sent and line.startswith(line_start):
                proc.send_signal(sig)
                sent = True
        return proc.wait(), "".join(output)
    finally:
        timer.cancel()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("reference")
    train_here([f"run.dir={run_dir}"])
    expected = losses(run_dir)
    assert sorted(expected) == list(range(1, STEPS + 1)) and expected[STEPS] < expected[1] - 1.0
    return expected


def assert_matches(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), (step, loss, expected[step])


def read_params(path: Path) -> dict:
    from trainer.checkpoint import load_model

    return load_model(path)[0].state_dict()


# ---------------------------------------------------------------------------------------------
# Non-finite steps.


@pytest.fixture(params=["host", "device", "compiled"])
def skip_mode(request, monkeypatch):
    """host: the CPU default (foreach AdamW, one scalar read per step); device: a fused AdamW on CPU, so the skip
    goes through the kernel's found_inf and the flags are read at log and save steps only (the CUDA path);
    compiled: optim.compile=true, the same on-device skip through ClippedAdamW's found_inf."""
    if request.param == "compiled":
        monkeypatch.setitem(globals(), "BASE", [*BASE, "optim.compile=true"])  # every run of the test, CLI ones too
    if request.param == "device":
        import trainer.train

        build = trainer.train.build_optimizer

        def build_fused(parts, cfg, device, zero1_mesh=None):
            import torch

            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                      for g in build(parts, cfg, device, zero1_mesh).param_groups]
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)

        monkeypatch.setattr(trainer.train, "build_optimizer", build_fused)
    return request.param


def test_nonfinite_skip_continues(tmp_path, one_thread, skip_mode):
    import torch

    run_dir = tmp_path / "run"
    train_here([f"run.dir={run_dir}", "train.steps=8", "log.every=2", "checkpoint.every=2", "checkpoint.keep=10",
                "fault.inject=nan", "fault.inject_step=3", "fault.inject_repeat=2", "fault.inject_module=layers.1.attention.wo"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "loss" in r}
    assert logged[4]["skipped_steps"] == 2 and math.isnan(logged[4]["loss"])  # steps 3-4 both skipped: no mean
    assert all("skipped_steps" not in logged[s] and math.isfinite(logged[s]["loss"]) for s in (2, 6, 8))
    at_2, at_4, final = (read_params(run_dir / "checkpoints" / f"step_{s:06d}") for s in (2, 4, 8))
    for name in at_2:  # skipped steps leave the weights as they were; training continued afterwards
        assert torch.equal(at_2[name], at_4[name]), name
        assert torch.isfinite(final[name]).all(), name
    assert any(not torch.equal(at_4[name], final[name]) for name in at_4)


@pytest.mark.parametrize("policy, block, log_every", [("stop", 1, 1), ("skip", 0, 4)])
def test_nonfinite_stop_names_the_module(tmp_path, capsys, one_thread, skip_mode, policy, block, log_every):
    """stop: the first non-finite step ends the run. skip with max_skips=1: the second in a row does. The error
    names the step and the module where NaN was injected; nothing non-finite is checkpointed."""
    import torch

    from trainer.__main__ import main
    from trainer.config import load_config
    from trainer.data import SampleStream, build_data

    run_dir = tmp_path / "run"
    module = f"layers.{block}.feed_forward.w2"
    code = main(BASE + [f"run.dir={run_dir}", "train.steps=8", f"log.every={log_every}", "checkpoint.every=1",
                        "checkpoint.keep=10", f"fault.nonfinite={policy}", "fault.max_skips=1", "fault.inject=nan",
                        "fault.inject_step=3", "fault.inject_repeat=2", f"fault.inject_module={module}"])
    err = capsys.readouterr().err.strip()
    stop_step = 3 if policy == "stop" else 4
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: non-finite gradient norm at step {stop_step} (") and f"in module {module};" in err, err
    report = json.loads((run_dir / "nonfinite.json").read_text())
    assert report["step"] == stop_step and report["module"] == module
    cfg = load_config(BASE + [f"run.dir={run_dir}"])
    batch = cfg.train.global_batch_size
    position = batch * (stop_step - 1)
    assert report["sample_position"] == position
    stream = SampleStream(build_data(cfg, None, log=lambda *_: None).train, seed=cfg.train.seed)
    assert report["sample_indices"] == stream.sample_indices(position, batch)
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved == [f"step_{s:06d}" for s in range(1, stop_step)], saved  # a skipped step saves; a stop step never
    for tensor in read_params(run_dir / "checkpoints" / saved[-1]).values():
        assert torch.isfinite(tensor).all()


def test_nonfinite_weights_are_never_saved(tmp_path, one_thread, monkeypatch):
    """Weights that turn NaN behind a finite gradient norm (what the guard cannot see): the save refuses, and the
    earlier checkpoint stays the newest."""
    import torch

    import trainer.train
    from trainer.faults import NonFiniteError

    clip = trainer.train.clip_grad_norm_
    calls = []

    def clip_then_poison(params, *args):
        norm = clip(params, *args)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                params[0].fill_(float("nan"))
        return norm

    monkeypatch.setattr(trainer.train, "clip_grad_norm_", clip_then_poison)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="non-finite values in model.* at step 4: not saved"):
        train_here([f"run.dir={run_dir}", "train.steps=8", "checkpoint.every=2"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002"]


# ---------------------------------------------------------------------------------------------
# Preemption, restarts, hangs, crashes inside a save.


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preempted_one_process_saves_and_resumes_exactly(tmp_path, reference, sig):
    run_dir = tmp_path / "run"
    code, out = signal_after([sys.executable, "-m", "trainer", *BASE, f"run.dir={run_dir}"], "step 3/", sig)
    line = [x for x in out.splitlines() if x.startswith(f"preempted by {sig.name} at step ")]
    assert code == 0 and len(line) == 1, out[-3000:]
    step = int(line[0].split()[5].rstrip(":"))
    checkpoint = run_dir / "checkpoints" / f"step_{step:06d}"
    assert 3 <= step < STEPS and f"checkpoint saved to {checkpoint}, exiting" in line[0]
    assert (checkpoint / "COMMITTED").is_file() and sorted(losses(run_dir)) == list(range(1, step + 1))
    train_here([f"run.dir={run_dir}"])
    assert_matches(losses(run_dir), reference)


def test_log_windows_survive_a_crash_and_a_preemption(tmp_path, one_thread):
    """log.every=3, checkpoint.every=4: after a crash (resumed at step 8, records of steps 9-10 set aside) and after
    a preemption inside a log window (carried in the checkpoint), metrics.jsonl holds the uninterrupted run's records."""
    windows = ["train.steps=20", "log.every=3", "checkpoint.every=4"]

    def records(run_dir: Path) -> list[dict]:
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: r[k] for k in ("step", "loss", "lr", "grad_norm")} for r in lines if "loss" in r]

    train_here([f"run.dir={tmp_path / 'reference'}", *windows])
    expected = records(tmp_path / "reference")
    assert [r["step"] for r in expected] == [3, 4, 6, 8, 9, 12, 15, 16, 18, 20]  # log steps and checkpoint steps

    crashed = tmp_path / "crashed"
    result = run([sys.executable, "-m", "trainer", *BASE, f"run.dir={crashed}", *windows, "fault.inject=kill",
                  "fault.inject_step=10"])
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    train_here([f"run.dir={crashed}", *windows])
    superseded = [json.loads(line)["step"] for line in (crashed / "metrics.superseded.jsonl").read_text().splitlines()]
    assert superseded == [9]
    preempted = tmp_path / "preempted"
    train_here([f"run.dir={preempted}", *windows, "fault.inject=sigterm", "fault.inject_step=11"])  # window 10-12
    assert (preempted / "checkpoints" / "step_000011" / "COMMITTED").is_file()
    train_here([f"run.dir={preempted}", *windows])
    for got in (records(crashed), records(preempted)):
        assert [r["step"] for r in got] == [r["step"] for r in expected]
        for a, b in zip(got, expected):
            assert a == pytest.approx(b, abs=1e-6), (a, b)


@pytest.mark.slow
def test_preempted_torchrun_sigterm_two_processes(tmp_path, reference):
    """SIGTERM to torchrun (exec'd by launch/train.sh): the agent forwards it, both ranks agree on one step, save,
    exit 0; torchrun itself exits non-zero (it re-raises the signal as an error)."""
    run_dir = tmp_path / "run"
    code, out = signal_after(["launch/train.sh", "--nproc-per-node=2", *BASE, f"run.dir={run_dir}", *TWO],
                             "step 3/", signal.SIGTERM)
    line = [x for x in out.splitlines() if x.startswith("preempted by SIGTERM at step ")]
    assert code != 0 and len(line) == 1, (code, out[-4000:])
    step = int(line[0].split()[5].rstrip(":"))
    checkpoint = run_dir / "checkpoints" / f"step_{step:06d}"
    assert 3 <= step < STEPS and f"checkpoint saved to {checkpoint}, exiting" in line[0]
    info = json.loads((checkpoint / "COMMITTED").read_text())
    assert info["world_size"] == 2 and info["step"] == step
    assert "2 x cpu" in out and "Sending process" in out and "closing signal SIGTERM" in out  # the agent forwarded it
    assert "exitcode" not in out  # no worker failed; torchrun reports only the signal it got
    train_here([f"run.dir={run_dir}"])  # resumed in one process: DCP reshards the FSDP checkpoint
    assert_matches(losses(run_dir), reference)


@pytest.mark.slow
def test_kill9_under_max_restarts_resumes(tmp_path, reference):
    """Rank 1 kills itself with SIGKILL after step 7 (first attempt only); torchrun restarts both workers, which
    resume from step 4, the newest complete checkpoint (lost work: under one checkpoint interval)."""
    run_dir = tmp_path / "run"
    result = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m", "trainer", *BASE,
                  f"run.dir={run_dir}", *TWO, "fault.inject=kill", "fault.inject_step=7", "fault.inject_rank=1"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "exitcode: -9" in result.stderr and f"resumed from {run_dir / 'checkpoints' / 'step_000004'} (step 4" in result.stdout
    assert_matches(losses(run_dir), reference)


@pytest.mark.slow
def test_watchdog_ends_a_hung_step(tmp_path):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    result = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trainer", *BASE, f"run.dir={run_dir}", *TWO,
                  "fault.watchdog_s=3", "fault.inject=hang", "fault.inject_step=3", "fault.inject_rank=1"], timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "watchdog: rank 1 stuck in step 3 for 3." in result.stderr and "(fault.watchdog_s=3): ending the run" in result.stderr
    assert "step 2/" in result.stdout and "step 3/" not in result.stdout
    assert elapsed < 60, elapsed


def test_crash_inside_a_save_keeps_the_previous_checkpoint(tmp_path, reference):
    """SIGKILL once step 8's files are written but before its COMMITTED marker, with keep=1: step 4 stays (pruning
    waits for a commit), resuming picks it, ignores the unfinished save, and ends where the reference does."""
    from trainer.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    result = run([sys.executable, "-m", "trainer", *BASE, f"run.dir={run_dir}", "checkpoint.keep=1",
                  "fault.inject=kill_in_save", "fault.inject_step=8"])
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    committed, incomplete = list_checkpoints(run_dir)
    assert [s for s, _ in committed] == [4] and [p.name for p in incomplete] == ["step_000008"]
    assert (incomplete[0] / ".metadata").is_file()  # the data was all there; only the marker was missing
    train_here([f"run.dir={run_dir}", "checkpoint.keep=1"])
    assert_matches(losses(run_dir), reference)
    assert [s for s, _ in list_checkpoints(run_dir)[0]] == [STEPS]


# ---------------------------------------------------------------------------------------------
# Launch scripts.


def test_multi_node_needs_an_explicit_endpoint(tmp_path):
    fake = tmp_path / "torchrun"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'started'}\n")
    fake.chmod(0o755)
    env = {**ENV, "TORCHRUN": str(fake)}
    for args, expected in ((["--nnodes=2", "--node-rank=0"], "needs --rdzv-endpoint=HOST:PORT"),
                           (["--nnodes=2", "--rdzv-endpoint=node0:29500"], "needs --node-rank"),
                           (["--nnodes=2", "--node-rank=2", "--rdzv-endpoint=node0:29500"], "--node-rank=2: must be in 0 .. 1"),
                           (["--rdzv-endpoint=node0:29500"], "only with --nnodes > 1"),
                           (["--nnodes=2", "--node-rank=0", "--rdzv-endpoint=node0"], "must be HOST:PORT")):
        result = subprocess.run(["launch/train.sh", *args, "recipe=debug"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 2 and expected in result.stderr and len(result.stderr.splitlines()) == 1, (args, result.stderr)
    assert not (tmp_path / "started").exists()


def test_slurm_template_endpoint_from_the_first_node(tmp_path):
    """The template under fake scontrol/srun/torchrun: every task gets node 0's address as the endpoint and its own
    node rank (SLURM_NODEID, read inside the task)."""
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"], cwd=ROOT).returncode == 0
    bin_dir, log = tmp_path / "bin", tmp_path / "torchrun.log"
    bin_dir.mkdir()
    scripts = {
        "scontrol": '[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu-a[07-08]" ] && printf "gpu-a07\\ngpu-a08\\n"',
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
                'i=0; while [ $i -lt "$SLURM_NNODES" ]; do SLURM_NODEID=$i "$@" || exit $?; i=$((i + 1)); done',
        "torchrun": f'echo "$*" >> {log}',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "8"}
    # SLURM runs a copy of the script from its spool folder, in the submit dir's stead: cwd elsewhere here.
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "recipe=debug", "train.steps=5"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        for part in ("--nnodes=2", f"--node-rank={rank}", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a07:29500",
                     "--rdzv-id=4242", f"--rdzv-conf=is_host={'true' if rank == 0 else 'false'}", "--nproc-per-node=8",
                     "--max-restarts=3", "SIGUSR1", "-m trainer recipe=debug train.steps=5"):
            assert part in line, (part, line)


@pytest.mark.slow
def test_two_nodes_on_localhost(tmp_path):
    """Two launch/train.sh invocations, node ranks 0 and 1, one process each, c10d rendezvous at 127.0.0.1."""
    run_dir = tmp_path / "run"
    endpoint = f"--rdzv-endpoint=127.0.0.1:{listen_ports(1)[0]}"
    args = ["--nnodes=2", endpoint, "--nproc-per-node=1", *BASE, "train.steps=4", f"run.dir={run_dir}", *TWO]
    node1 = subprocess.Popen(["launch/train.sh", "--node-rank=1", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        node0 = run(["launch/train.sh", "--node-rank=0", *args], timeout=120)
        out1, _ = node1.communicate(timeout=60)
    finally:
        node1.kill()
    assert node0.returncode == 0 and node1.returncode == 0, node0.stderr[-3000:] + out1[-3000:]
    info = json.loads((run_dir / "checkpoints" / "step_000004" / "COMMITTED").read_text())
    assert info["world_size"] == 2 and sorted(losses(run_dir)) == [1, 2, 3, 4]
