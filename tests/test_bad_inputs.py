"""Bad configs and inputs: each gives one clear `error:` line on stderr and exit code 2, and leaves a run dir that
already holds a checkpoint and metrics.jsonl exactly as it was (bytes and mtimes). The only other stderr output
allowed is the progress bars of Hugging Face `datasets` while a local file is read.

Most cases run in-process through `trainer.__main__.main` (fast); the CLI and torchrun cases check the same through
real processes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "ridgeline"
BASE = ["recipe=debug", "train.steps=2", "log.progress=lines", "run.device=cpu", "train.val_batches=0"]


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, sha256) of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """Run dirs and inputs the cases point at: `existing` (a checkpoint and metrics.jsonl), `seeded` (metrics.jsonl,
    no checkpoint: checkpoint.load applies), `bpe` (an unreadable tokenizer.json), and broken files."""
    from trainer.config import load_config
    from trainer.train import train

    root = tmp_path_factory.mktemp("bad")
    existing = root / "existing"
    train(load_config(BASE + [f"run.dir={existing}", f"data.cache_dir={CACHE}"]))
    checkpoint = existing / "checkpoints" / "step_000002"
    assert (checkpoint / "COMMITTED").is_file() and (existing / "metrics.jsonl").stat().st_size > 0

    seeded = root / "seeded"
    seeded.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy2(existing / name, seeded / name)
    bpe = root / "bpe"
    bpe.mkdir()
    shutil.copy2(existing / "metrics.jsonl", bpe / "metrics.jsonl")
    (bpe / "tokenizer.json").write_text("{ this is not a tokenizer")

    def broken(name: str) -> Path:
        path = root / "broken" / name / "checkpoints" / "step_000002"
        shutil.copytree(checkpoint, path)
        return path

    garbled = broken("garbled")
    (garbled / ".metadata").write_bytes(os.urandom((garbled / ".metadata").stat().st_size))
    incomplete = broken("incomplete")
    (incomplete / "COMMITTED").unlink()
    flipped = broken("flipped")  # same size, NaN bytes mid-file: no reader error, only the values are wrong
    with open(flipped / "__0_0.distcp", "r+b") as file:
        file.seek((flipped / "__0_0.distcp").stat().st_size // 8 * 4)
        file.write(b"\xff" * 8)
    truncated = broken("truncated")
    (truncated / "__0_0.distcp").write_bytes((truncated / "__0_0.distcp").read_bytes()[:100])
    data = root / "data"
    data.mkdir()
    (data / "empty.txt").write_text("")
    (data / "tiny.txt").write_text("In the beginning.\n")
    (data / "docs.jsonl").write_text('{"body": "no text field here"}\n')
    (data / "mixed").mkdir()
    (data / "mixed" / "a.txt").write_text("some text\n")
    (data / "mixed" / "b.jsonl").write_text('{"text": "other"}\n')
    (root / "plain_file").write_text("")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    words = "light dark water earth heaven seed fruit tree day night".split()
    (data / "corpus.txt").write_text("\n\n".join(" ".join(words[(i * j) % 10] for j in range(400)) for i in range(60)))
    (root / "not_a_checkpoint").mkdir()
    (root / "hf_without_config").mkdir()
    from trainer.export import export_hf

    export_hf(checkpoint, root / "hf")
    checkpoints_file = root / "checkpoints_file"  # <run.dir>/checkpoints is a file, not a folder
    checkpoints_file.mkdir()
    shutil.copy2(existing / "metrics.jsonl", checkpoints_file / "metrics.jsonl")
    (checkpoints_file / "checkpoints").write_text("")
    return {"root": root, "existing": existing, "seeded": seeded, "bpe": bpe, "checkpoint": checkpoint,
            "garbled": garbled, "incomplete": incomplete, "truncated": truncated, "flipped": flipped, "data": data,
            "checkpoints_file": checkpoints_file}


# (expected text in the error line, target run dir, overrides); {name} is replaced from `world`.
CASES = {
    "unknown recipe": ("recipe='nope': no such recipe", "existing", ["recipe=nope"]),
    "unknown key": ("train.nope: unknown key", "existing", ["train.nope=1"]),
    "unknown section": ("nope.x: unknown key", "existing", ["nope.x=1"]),
    "not key=value": ("overrides take the form key=value", "existing", ["train.steps"]),
    "non-integer value": ("train.steps", "existing", ["train.steps=abc"]),
    "float for an int": ("train.steps", "existing", ["train.steps=2.5"]),
    "unknown config group choice": ("no configs/model/huge.yaml", "existing", ["model=huge"]),
    "malformed recipe file": ("cannot read", "existing", ["recipe={root}/bad.yaml"]),
    "negative learning rate": ("optim.lr=-0.1: must be > 0", "existing", ["optim.lr=-0.1"]),
    "zero steps": ("train.steps=0: must be > 0", "existing", ["train.steps=0"]),
    "unknown pp schedule": ("parallel.pp_schedule='zigzag': must be one of", "existing", ["parallel.pp_schedule=zigzag"]),
    "unknown precision": ("train.precision='fp16': must be one of", "existing", ["train.precision=fp16"]),
    "unknown tokenizer": ("data.tokenizer='sentencepiece': must be one of", "existing", ["data.tokenizer=sentencepiece"]),
    "seq_len beyond a learned position table": ("train.seq_len=512: beyond model.max_seq_len=256", "existing",
                                                ["model.pos_encoding=learned", "train.seq_len=512"]),
    "degrees for more processes than run": ("but WORLD_SIZE=1", "existing", ["parallel.dp_shard=2"]),
    "batch not divisible": ("train.global_batch_size=6: not divisible", "existing", ["train.global_batch_size=6"]),
    "heads not dividing dim": ("model.dim=66 must be divisible by model.num_heads=4", "existing", ["model.dim=66"]),
    "vocab smaller than the tokenizer": ("model.vocab_size=100: smaller than", "existing", ["model.vocab_size=100"]),
    "sequence parallel without tp": ("parallel.sequence_parallel=true needs parallel.tp > 1", "existing",
                                     ["parallel.sequence_parallel=true"]),
    "val fraction out of range": ("data.val_fraction=0.7", "existing", ["data.val_fraction=0.7"]),
    "unknown wandb mode": ("log.wandb='sometimes'", "existing", ["log.wandb=sometimes"]),
    "keep zero checkpoints": ("checkpoint.keep=0: must be > 0", "existing", ["checkpoint.keep=0"]),
    "unknown non-finite policy": ("fault.nonfinite='maybe'", "existing", ["fault.nonfinite=maybe"]),
    "negative max_skips": ("fault.max_skips=-1: must be >= 0", "existing", ["fault.max_skips=-1"]),
    "negative watchdog": ("fault.watchdog_s=-5.0: must be >= 0", "existing", ["fault.watchdog_s=-5"]),
    "nan injection without a module": ("fault.inject='nan': needs fault.inject_module", "existing", ["fault.inject=nan", "fault.inject_step=1"]),
    "nan injection into no module": ("fault.inject_module='layers.9.nope': no such module", "existing",
                                     ["fault.inject=nan", "fault.inject_step=1", "fault.inject_module=layers.9.nope"]),
    "missing dataset path": ("data.dataset='/nonexistent/corpus.txt': no such file or folder", "existing",
                             ["data.dataset=/nonexistent/corpus.txt"]),
    "empty dataset file": ("empty.txt", "existing", ["data.dataset={data}/empty.txt"]),
    "dataset shorter than one sample": ("each split needs at least seq_len + 1 = 65", "existing", ["data.dataset={data}/tiny.txt"]),
    "text field not in the data": ("data.text_field='text': not a column", "existing", ["data.dataset={data}/docs.jsonl"]),
    "dataset folder of mixed kinds": ("needs files of one kind", "existing", ["data.dataset={data}/mixed"]),
    "unreadable tokenizer file": ("data.tokenizer='bpe': cannot read", "bpe", ["data.tokenizer=bpe", "data.bpe_vocab_size=300"]),
    "run dir not writable": ("not writable", None, ["run.dir={root}/plain_file/run"]),
    "checkpoint.load nonexistent": ("no such checkpoint", "seeded", ["checkpoint.load={root}/missing"]),
    "corrupt checkpoint metadata": ("cannot read .metadata", "seeded", ["checkpoint.load={garbled}"]),
    "checkpoint without its marker": ("incomplete checkpoint", "seeded", ["checkpoint.load={incomplete}"]),
    "truncated checkpoint file": ("corrupted or truncated", "seeded", ["checkpoint.load={truncated}"]),
    "checkpoint with NaN bytes": ("non-finite values in", "seeded", ["checkpoint.load={flipped}"]),
    "not a checkpoint folder": ("not a checkpoint folder", "seeded", ["checkpoint.load={root}/not_a_checkpoint"]),
    "hf folder without config.json": ("no config.json", "seeded", ["checkpoint.load=hf:{root}/hf_without_config"]),
    "checkpoint from another model shape": ("it was saved for another model (model.dim=64 there, 128 here", "seeded",
                                            ["checkpoint.load={checkpoint}", "model.dim=128", "model.ffn_dim=256"]),
    "own checkpoint, model changed": ("model.num_layers=2 there, 3 here", "existing", ["model.num_layers=3"]),
    # Fail only once the weights are read: the run dir's metrics.jsonl and tokenizer.json must still be untouched.
    "hf weights of another model shape": ("does not match this model", "seeded",
                                          ["checkpoint.load=hf:{root}/hf", "model.dim=128", "model.ffn_dim=256"]),
    "untied hf weights into a tied model": ("tie_word_embeddings=false there (its own lm_head)", "seeded",
                                            ["checkpoint.load=hf:{root}/hf", "model.tie_embeddings=true"]),
    "bpe run into a byte run's dir, model changed": ("model.dim=64 there, 128 here", "existing",
                                                     ["data.tokenizer=bpe", "data.bpe_vocab_size=300", "data.dataset={data}/corpus.txt",
                                                      "model.dim=128", "model.ffn_dim=256"]),
    "checkpoints path is a file": ("is not a folder", "checkpoints_file", []),
    "data cache path is a file": ("exists and is not a folder", "existing", ["data.cache_dir={existing}/metrics.jsonl"]),
}


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    """In this process (the `world` fixture holds `one_thread`)."""
    from trainer.__main__ import main

    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_bad_inputs_give_one_line_and_touch_nothing(world, capsys):
    names = ("existing", "seeded", "bpe", "checkpoints_file")
    before = {name: snapshot(world[name]) for name in names}
    failures = []
    for case, (expected, target, overrides) in CASES.items():
        overrides = [o.format(**world) for o in overrides]
        run_dir = [f"run.dir={world[target]}"] if target else []
        # Local data files tokenize into a cache of their own; the rest read the shared, already built one.
        cache = world["root"] / "cache" if any(o.startswith("data.dataset=") for o in overrides) else CACHE
        code, err = run_main(capsys, [*BASE, f"data.cache_dir={cache}", *run_dir, *overrides])
        lines = [line for line in err.splitlines() if line.strip() and "examples/s]" not in line]
        if not (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]):
            failures.append(f"{case}: exit {code}, stderr {err!r}")
        for name in names:
            if snapshot(world[name]) != before[name]:
                failures.append(f"{case}: changed files in {name}/")
                before[name] = snapshot(world[name])
    assert not failures, "\n".join(failures)


def test_failed_run_creates_no_run_dir(world, capsys):
    """Errors found after the config checks (a checkpoint, the data) leave no new folder behind either."""
    for overrides in (["checkpoint.load={root}/not_a_checkpoint"], ["data.dataset={data}/empty.txt"],
                      ["checkpoint.load=hf:{root}/hf", "model.dim=128", "model.ffn_dim=256"]):
        run_dir = world["root"] / "fresh" / "run"
        code, err = run_main(capsys, [*BASE, f"data.cache_dir={world['root'] / 'cache'}", f"run.dir={run_dir}",
                                      *[o.format(**world) for o in overrides]])
        assert code == 2 and err.splitlines()[-1].startswith("error: "), err
        assert not (world["root"] / "fresh").exists(), overrides


def test_tensor_parallel_degree_not_dividing_heads(world, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # validation reads the world size torchrun would set
    code, err = run_main(capsys, [*BASE, f"data.cache_dir={CACHE}", f"run.dir={world['existing']}", "parallel.tp=3"])
    assert code == 2 and err == "error: model.num_heads=4 must be divisible by parallel.tp=3", err


ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_cli_exit_code_and_line(world):
    before = snapshot(world["existing"])
    result = subprocess.run([sys.executable, "-m", "trainer", *BASE, f"run.dir={world['existing']}", "optim.lr=-1"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "error: optim.lr=-1.0: must be > 0", result.stderr
    assert snapshot(world["existing"]) == before


@pytest.mark.slow
def test_torchrun_world_size_not_matching_degrees(world):
    """Degrees for 4 processes under 2: every rank finds the error, rank 0 prints it once, each exits 2; torchrun
    itself then exits 1 with its own failure report."""
    before = snapshot(world["existing"])
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer", *BASE,
         f"run.dir={world['existing']}", "parallel.dp_shard=2", "parallel.tp=2"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    expected = "error: parallel: pp=1 x dp_replicate=1 x dp_shard=2 x tp=2 = 4 processes, but WORLD_SIZE=2"
    assert result.returncode != 0
    assert result.stderr.count(expected) == 1, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # the workers' own exit code, in torchrun's report
    assert snapshot(world["existing"]) == before
