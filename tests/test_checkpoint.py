"""Checkpoint tests: exact resume (1 process, 2-process FSDP, ZeRO-1), resume into other layouts (4 -> pp2, 4 -> 1),
auto-resume from the newest committed checkpoint, keep=N pruning, async saves, and one clear line for every bad
checkpoint. Multi-process runs go through torchrun with this file as the worker (`python tests/test_checkpoint.py`
under torchrun runs a JSON list of override lists, one train() each, in one launch to pay the start-up once).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
from distributed import listen_ports  # noqa: E402

STEPS = 8
# Two stages per pipeline rank (each rank's model parts: two modules).
INTERLEAVED = ["model.num_layers=4", "parallel.virtual_stages=2", "parallel.pp_schedule=interleaved_1f1b",
               "train.micro_batch_size=2"]
BASE = ["recipe=debug", f"train.steps={STEPS}", "log.every=1", "log.progress=lines", "run.device=cpu",
        "checkpoint.every=4", "train.val_batches=0", f"data.cache_dir={ROOT / '.cache' / 'ridgeline'}"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; on a resumed run, the lines after the resume win."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def train_here(overrides: list[str]) -> None:
    from trainer.config import load_config
    from trainer.train import train

    train(load_config(BASE + overrides))


def torchrun(nproc: int, runs: list[list[str]]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, json.dumps(listen_ports(len(runs))), json.dumps(runs)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def worker(ports: list[int], runs: list[list[str]]) -> None:
    """Under torchrun: each run starts its own process group on its own store (a re-used store would hand
    the second group the first one's stale addresses)."""
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    for port, overrides in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        train_here(overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> Path:
    """Every training run of this module, in three launches (4 processes, 2 processes, this process)."""
    root = tmp_path_factory.mktemp("ckpt")
    a4 = root / "a4" / "checkpoints" / "step_000004"
    torchrun(4, [[f"run.dir={root / 'a4'}", "parallel.dp_shard=2", "parallel.tp=2", "checkpoint.async_save=true"]])
    from trainer.export import export_hf

    hf = export_hf(a4, root / "hf")
    from_hf = [f"checkpoint.load=hf:{hf}", "train.steps=2", "checkpoint.enabled=false"]
    torchrun(2, [
        [f"run.dir={root / 'pp2'}", "parallel.pp=2", f"checkpoint.load={a4}"],
        [f"run.dir={root / 'hf_tp2'}", "parallel.tp=2", *from_hf],
        [f"run.dir={root / 'interleaved'}", "parallel.pp=2", *INTERLEAVED],
        [f"run.dir={root / 'fsdp'}", "parallel.dp_shard=2", "checkpoint.async_save=true"],
        [f"run.dir={root / 'fsdp_resumed'}", "parallel.dp_shard=2", f"checkpoint.load={root / 'fsdp' / 'checkpoints' / 'step_000004'}"],
        [f"run.dir={root / 'zero1'}", "parallel.dp_shard=2", "parallel.zero=1"],
        [f"run.dir={root / 'zero1_resumed'}", "parallel.dp_shard=2", "parallel.zero=1", f"checkpoint.load={root / 'zero1' / 'checkpoints' / 'step_000004'}"],
    ])
    train_here([f"run.dir={root / 'one'}", f"checkpoint.load={a4}"])
    train_here([f"run.dir={root / 'hf_one'}", *from_hf])
    train_here([f"run.dir={root / 'interleaved_one'}", "model.num_layers=4",
                f"checkpoint.load={root / 'interleaved' / 'checkpoints' / 'step_000004'}"])
    train_here([f"run.dir={root / 'one_from_zero1'}", f"checkpoint.load={root / 'zero1' / 'checkpoints' / 'step_000004'}"])
    train_here([f"run.dir={root / 'ref'}", "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.async_save=true"])
    shutil.copytree(root / "ref", root / "auto")
    (root / "auto" / "checkpoints" / "step_000008" / "COMMITTED").unlink()  # as if killed mid-save
    train_here([f"run.dir={root / 'auto'}", "checkpoint.every=2", "checkpoint.keep=3"])
    return root


def test_same_layout_resume_is_exact(runs):
    # "auto" holds a copy of "ref"'s metrics.jsonl up to step 8, then its own lines from step 7 on.
    for ref, resumed, first in (("fsdp", "fsdp_resumed", 5), ("zero1", "zero1_resumed", 5), ("ref", "auto", 7)):
        records = [json.loads(line) for line in (runs / resumed / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps[-(STEPS + 1 - first):] == list(range(first, STEPS + 1)), (resumed, steps)
        expected, got = losses(runs / ref), losses(runs / resumed)
        assert got == {s: expected[s] for s in got}, (resumed, got, expected)


def test_cross_layout_resume(runs):
    import torch

    from trainer.checkpoint import load_model

    a4, zero1, interleaved = losses(runs / "a4"), losses(runs / "zero1"), losses(runs / "interleaved")
    assert a4[STEPS] < a4[1] - 0.5  # the model learns, so the comparison is not vacuous
    for resumed, expected in (("pp2", a4), ("one", a4), ("one_from_zero1", zero1), ("interleaved_one", interleaved)):
        got = losses(runs / resumed)
        assert sorted(got) == [5, 6, 7, 8], (resumed, got)
        for step, loss in got.items():
            assert loss == pytest.approx(expected[step], abs=1e-5), (resumed, step, loss, expected[step])
    # What pipeline ranks saved (each its stages) reads back as one model.
    for pipelined, reference in (("pp2", "one"), ("interleaved", "interleaved_one")):
        merged, reference = load_model(runs / pipelined)[0].state_dict(), load_model(runs / reference)[0].state_dict()
        assert merged.keys() == reference.keys()
        for name in merged:
            torch.testing.assert_close(merged[name], reference[name], atol=1e-5, rtol=0)


def test_import_from_hf_into_tensor_parallel(runs):
    expected, got = losses(runs / "hf_one"), losses(runs / "hf_tp2")
    assert sorted(got) == [1, 2] and not (runs / "hf_tp2" / "checkpoints").exists()
    assert got == pytest.approx(expected, abs=1e-5)
    assert expected[1] < losses(runs / "a4")[1] - 0.5  # trained weights, not a fresh init


def test_auto_resume_newest_committed_and_keep(runs):
    from trainer.checkpoint import list_checkpoints

    committed, incomplete = list_checkpoints(runs / "ref")
    assert [s for s, _ in committed] == [4, 6, 8] and not incomplete  # keep=3 pruned step 2
    committed, incomplete = list_checkpoints(runs / "auto")
    assert [s for s, _ in committed] == [4, 6, 8] and not incomplete  # step 8 saved again, then committed
    info = json.loads((runs / "a4" / "checkpoints" / "step_000008" / "COMMITTED").read_text())
    assert info["world_size"] == 4 and "dp_shard=2 x tp=2" in info["layout"] and info["step"] == 8
    stalls = [json.loads(line) for line in (runs / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in stalls if "checkpoint_stall_s" in r]) == 4  # steps 2, 4, 6, 8


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    from trainer.__main__ import main

    code = main(BASE + argv)
    return code, capsys.readouterr().err.strip()


def test_bad_checkpoints_give_one_line(runs, tmp_path, capsys, one_thread):
    good = runs / "ref" / "checkpoints" / "step_000004"

    def broken(name: str) -> Path:
        path = tmp_path / name / "checkpoints" / "step_000004"
        shutil.copytree(good, path)
        return path

    incomplete = broken("incomplete")
    (incomplete / "COMMITTED").unlink()
    truncated = broken("truncated")
    data = truncated / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    garbled = broken("garbled")
    size = (garbled / ".metadata").stat().st_size
    (garbled / ".metadata").write_bytes(os.urandom(size))
    (tmp_path / "empty").mkdir()
    cases = {
        "no such checkpoint": [f"checkpoint.load={tmp_path / 'missing'}"],
        "incomplete checkpoint": [f"checkpoint.load={incomplete}"],
        "corrupted or truncated": [f"checkpoint.load={truncated}"],
        "cannot read .metadata": [f"checkpoint.load={garbled}"],
        "not a checkpoint folder": [f"checkpoint.load={tmp_path / 'empty'}"],
        "no committed checkpoint": [f"checkpoint.load={tmp_path / 'incomplete'}"],  # a run dir
        "model.dim=64 there, 128 here": [f"checkpoint.load={good}", "model.dim=128"],
    }
    for i, (expected, argv) in enumerate(cases.items()):
        code, err = run_cli(capsys, [f"run.dir={tmp_path / f'run{i}'}", *argv])
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, (expected, err)


def test_metadata_unpickler_refuses_code(tmp_path):
    from trainer.checkpoint import SafeFileSystemReader, check_checkpoint
    from trainer.config import ConfigError

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "COMMITTED").write_text("{}")
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        SafeFileSystemReader(tmp_path).read_metadata()
    with pytest.raises(ConfigError, match="cannot read .metadata"):
        check_checkpoint(tmp_path, {}, model_cfg=None)


def make_checkpoint(path: Path, step: int) -> Path:
    folder = path / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "COMMITTED").write_text(json.dumps({"step": step}))
    return folder


def test_load_source_rules(tmp_path):
    from trainer.checkpoint import find_load_source
    from trainer.config import CheckpointConfig, ConfigError

    run, other = tmp_path / "run", tmp_path / "other"
    seed = make_checkpoint(other, 10)
    assert find_load_source(CheckpointConfig(), run).path is None
    assert find_load_source(CheckpointConfig(load=str(seed)), run).path == seed
    assert find_load_source(CheckpointConfig(load=str(other)), run).path == seed  # a run dir: its newest
    own = make_checkpoint(run, 4)
    newest = make_checkpoint(run, 8)
    (run / "checkpoints" / "step_000012").mkdir()  # unfinished: never chosen
    source = find_load_source(CheckpointConfig(load=str(seed)), run)
    assert source.path == newest and source.resumes and any("step_000012" in n for n in source.notes)
    with pytest.raises(ConfigError, match="newer checkpoints"):
        find_load_source(CheckpointConfig(load=str(own)), run)
    assert find_load_source(CheckpointConfig(enabled=False), run).path is None
    with pytest.raises(ConfigError, match="no config.json"):
        find_load_source(CheckpointConfig(load=f"hf:{other}"), tmp_path / "fresh")
    (other / "config.json").write_text("{}")
    hf = find_load_source(CheckpointConfig(load=f"hf:{other}"), tmp_path / "fresh")
    assert hf.hf and hf.path == other and not hf.resumes
    assert find_load_source(CheckpointConfig(load=f"hf:{other}"), run).path == newest


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]), json.loads(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the gloo teardown at interpreter exit (see trainer/__main__.py)


def test_fp8_zero3_checkpoint_holds_plain_tensors(tmp_path):
    """Under ZeRO-3, torchao's float8 all-gather wraps each weight shard in its own tensor subclass. The checkpoint
    stores the plain tensors, so tools that never import torchao (export, sample, a bf16 run) read it."""
    fp8 = ["model.dim=1024", "model.ffn_dim=1024", "model.num_heads=8", "model.num_kv_heads=8", "model.vocab_size=1024",
           "optim.lr=3e-4", "train.precision=fp8", "train.steps=4"]
    run_dir = tmp_path / "fp8_zero3"
    torchrun(2, [[f"run.dir={run_dir}", *fp8, "parallel.dp_shard=2", "parallel.zero=3"]])
    files = list((run_dir / "checkpoints" / "step_000004").glob("*.distcp"))
    assert files and not any(b"torchao" in f.read_bytes() for f in files)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "trainer.export", f"checkpoint={run_dir}", f"out={tmp_path / 'hf'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), result.stderr[-3000:]


def test_a_failed_dcp_read_is_one_config_error(tmp_path, monkeypatch):
    """DCP reports read failures as CheckpointException, a BaseException: it must still become one error line."""
    from torch.distributed.checkpoint.api import CheckpointException

    import trainer.checkpoint as checkpoint
    from trainer.config import ConfigError

    def failing_load(*args, **kwargs):
        raise CheckpointException("read failed", {0: (ValueError("bad bytes"), None)})  # (exception, traceback)

    monkeypatch.setattr(checkpoint.dcp, "load", failing_load)
    with pytest.raises(ConfigError, match="reading failed") as info:
        checkpoint._dcp_load({}, tmp_path)
    assert str(info.value).endswith("bad bytes") and "\n" not in str(info.value), str(info.value)
