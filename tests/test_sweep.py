"""Sweeps (trainer/sweep.py) and reports (trainer/report.py): points from lists, multirun and the planner,
a real two-layout CPU sweep with a failed and a rejected point, and PNG reports of a run dir and a sweep dir."""
import csv
import json
import math
import types
from pathlib import Path

import pytest

from trainer import report, sweep
from trainer.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_planner(layouts: list[dict], predict_layout=None):
    """A stand-in for parallel/plan.py's interface (ranked layouts, one layout's figures); records what it was asked."""
    calls = []

    def plan_layouts(cfg, *, world_size, gpu):
        calls.append((cfg.model.dim, world_size, gpu))
        return layouts

    return types.SimpleNamespace(plan_layouts=plan_layouts, predict_layout=predict_layout), calls


def prediction(overrides, *, fits=True, mem=0.5, step=0.02, tokens=20000.0):
    return {"overrides": overrides, "fits": fits, "pred_mem_gb": mem, "pred_step_s": step, "pred_tokens_per_s": tokens}


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, (path, len(data))


def test_point_sources_parse():
    assert sweep.parse_layouts("pp=1,tp=2; pp=2,train.micro_batch_size=2;nproc=1") == [
        ["parallel.pp=1", "parallel.tp=2"], ["parallel.pp=2", "train.micro_batch_size=2"], ["nproc=1"]]
    assert sweep.expand_multirun(["parallel.tp=1,2", "parallel.dp_shard=2,1"]) == [
        ["parallel.tp=1", "parallel.dp_shard=2"], ["parallel.tp=1", "parallel.dp_shard=1"],
        ["parallel.tp=2", "parallel.dp_shard=2"], ["parallel.tp=2", "parallel.dp_shard=1"]]
    with pytest.raises(ConfigError, match="only after -m"):
        sweep.parse_args(["parallel.tp=1,2"])
    with pytest.raises(ConfigError, match="one source of points"):
        sweep.parse_args(["layouts=tp=2", "top=2"])
    torchrun_output = "\n".join([
        "step 2/4 | loss 5.9", "[rank1]: Traceback (most recent call last):", '[rank1]:   File "x.py", line 3',
        "[rank1]: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "[rank0]: RuntimeError: Connection closed by peer",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "trainer.bench FAILED"])
    assert sweep.get_error_line(torchrun_output) == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert sweep.get_error_line("noise\nerror: data.dataset='x': no such file\nmore") == "error: data.dataset='x': no such file"


def test_multirun_rejects_points_the_validator_rejects(tmp_path, capsys, monkeypatch):
    priced = []

    def predict_layout(cfg, degrees, *, gpu):
        priced.append((degrees["tp"], degrees["dp_shard"], gpu))
        return prediction([], step=0.1 * degrees["tp"])

    monkeypatch.setattr(sweep, "planner", fake_planner([], predict_layout)[0])
    results = sweep.sweep(["recipe=debug", "nproc=2", "steps=4", f"out={tmp_path}", "dry_run=true", "gpu=H200",
                           "-m", "parallel.tp=1,2", "parallel.dp_shard=2,1"])
    assert [r["status"] for r in results] == ["planned", "rejected", "rejected", "planned"]
    assert priced == [(1, 2, "H200"), (2, 1, "H200")]  # only valid points, with their resolved degrees
    assert [r.get("pred_step_s") for r in results] == [pytest.approx(0.1), None, None, pytest.approx(0.2)]
    assert "= 1 processes, but WORLD_SIZE=2" in results[1]["error"]
    assert "= 4 processes, but WORLD_SIZE=2" in results[2]["error"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [p["layout"] for p in saved["points"]] == ["tp=1,dp_shard=2", "tp=1,dp_shard=1", "tp=2,dp_shard=2", "tp=2,dp_shard=1"]
    assert "rejected: parallel: pp=1" in capsys.readouterr().out


def test_top_k_takes_the_planners_fitting_layouts(tmp_path, monkeypatch):
    planner, calls = fake_planner([
        prediction(["parallel.dp_shard=4"], fits=False),
        prediction(["parallel.tp=2", "parallel.sequence_parallel=true"], step=0.01),
        prediction(["parallel.tp=3"]),  # the planner's word does not bypass the validator
        prediction(["parallel.dp_shard=2"], step=0.03),
    ])
    monkeypatch.setattr(sweep, "planner", planner)
    results = sweep.sweep(["recipe=debug", "nproc=2", "steps=4", f"out={tmp_path}", "top=3", "gpu=H100", "dry_run=true"])
    assert calls and calls[0] == (64, 2, "H100")
    assert [(r["layout"], r["status"]) for r in results] == [
        ("tp=2,sequence_parallel=true", "planned"), ("tp=3", "rejected"), ("dp_shard=2", "planned")]
    assert results[0]["pred_step_s"] == 0.01 and results[2]["pred_step_s"] == 0.03
    assert "model.num_heads" in results[1]["error"] or "WORLD_SIZE" in results[1]["error"]
    with pytest.raises(ConfigError, match="gpu=NAME"):
        sweep.sweep(["recipe=debug", "nproc=2", f"out={tmp_path}", "top=1", "dry_run=true"])


@pytest.mark.slow
def test_cpu_sweep_measures_records_failures_and_reports(tmp_path, monkeypatch):
    """Two real layouts (1 and 2 processes), one point that fails at run time, one the validator rejects."""
    monkeypatch.chdir(ROOT)  # the points run `-m trainer.bench` from here, with the repository's data cache
    planner, _ = fake_planner([], lambda cfg, degrees, *, gpu: prediction([], mem=0.4, step=0.05 * degrees["dp_shard"]))
    monkeypatch.setattr(sweep, "planner", planner)
    out = tmp_path / "sweep"
    layouts = "nproc=1;dp_shard=2;nproc=1,data.dataset=/no/such/corpus;tp=3"
    results = sweep.sweep(["recipe=debug", "nproc=2", "steps=4", f"out={out}", f"layouts={layouts}", "gpu=fake",
                           "train.val_batches=1"])
    assert [r["status"] for r in results] == ["ok", "ok", "failed", "rejected"], [r.get("error") for r in results]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["layout"] for row in rows] == ["nproc=1", "dp_shard=2", "nproc=1,data.dataset=/no/such/corpus", "tp=3"]
    for row in rows[:2]:
        assert float(row["tokens_per_s"]) > 0 and float(row["step_s"]) > 0 and float(row["peak_mem_gb"]) > 0
        assert math.isfinite(float(row["final_loss"])) and 4.0 < float(row["final_loss"]) < 7.0
    # Same data, same global batch: the layout does not change the loss.
    assert float(rows[0]["final_loss"]) == pytest.approx(float(rows[1]["final_loss"]), abs=2e-3)
    assert rows[0]["nproc"] == "1" and rows[1]["nproc"] == "2"
    assert float(rows[0]["pred_step_s"]) == 0.05 and float(rows[1]["pred_step_s"]) == 0.1  # each point's own layout
    assert "no such" in rows[2]["error"] and "WORLD_SIZE=2" in rows[3]["error"]

    written = report.report(out)
    for name in ("sweep_throughput.png", "sweep_memory.png", "sweep_step_time.png", "sweep_loss.png"):
        assert_png(written.parent / name)
    text = written.read_text()
    assert "| dp_shard=2 | 2 | ok |" in text and "| tp=3 | 2 | rejected |" in text

    # A run dir of that sweep, with per-block statistics in the format the trainer's layer_stats writes.
    run_dir = out / "00_nproc_1"
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in (2, 4):
            stats = {k: [0.1 * step, 0.2 * step] for k in ("grad_norm", "param_norm", "update_ratio", "act_rms", "act_max")}
            f.write(json.dumps({"step": step, "layer_stats": stats}) + "\n")
    assert report.main([str(run_dir), f"out={tmp_path / 'run_report'}"]) == 0
    for name in ("loss.png", "throughput.png", "layer_grad_norm.png", "layer_param_norm.png", "layer_update_ratio.png",
                 "layer_act_rms.png", "layer_act_max.png"):
        assert_png(tmp_path / "run_report" / name)
    assert "final val loss" in (tmp_path / "run_report" / "report.md").read_text()
    assert report.main([str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("argv, said", [
    (["dry_run=on"], "error: dry_run='on': must be one of"),
    (["warmup=abc"], "error: warmup='abc': must be an integer"),
    (["timeout=abc"], "error: timeout='abc':"),
    (["out="], "error: out='': must name a folder"),
    (["recipe=nope"], "error: recipe='nope': no such recipe"),
    (["model=nope", "layouts=tp=1;dp_shard=1"], "error: model='nope':"),  # shared by every point: one error
    (["layouts=nproc=1;nproc=x"], "error: nproc='x': must be an integer"),  # before the first point runs
    (["log.every=3"], "error: warmup=2: not a multiple of log.every=3"),
])
def test_sweep_refuses_bad_settings_before_any_work(argv, said, tmp_path, monkeypatch, capsys):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ran = []
    monkeypatch.setattr(sweep, "run_point", lambda command, run_dir, timeout_s: ran.append(command) or (1, "x"))
    defaults = {"recipe": "debug", "nproc": "1", "steps": "4", "out": str(out)}
    defaults.update(item.split("=", 1) for item in argv)
    assert sweep.main([f"{k}={v}" for k, v in defaults.items()]) == 2
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1, err
    assert not ran and not out.exists() and not list(cwd.iterdir())


def test_sweep_stores_absolute_run_dirs_and_says_its_usage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = sweep.sweep(["recipe=debug", "nproc=1", "steps=4", "out=rel", "dry_run=yes"])
    assert results[0]["run_dir"] == str(tmp_path / "rel" / "00_recipe")
    assert json.loads((tmp_path / "rel" / "results.json").read_text())["points"][0]["run_dir"] == results[0]["run_dir"]
    assert sweep.main(["--help"]) == 0 and "python -m trainer.sweep" in capsys.readouterr().out


def write_run(run_dir: Path, steps=(2, 4), tail: str = "") -> None:
    run_dir.mkdir(parents=True)
    records = [{"step": s, "loss": 6.0 - 0.1 * s, "tokens_per_s": 1000.0, "mem_gb": 0.1, "time_s": 0.1 * s} for s in steps]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_report_skips_a_torn_last_line_and_refuses_broken_files(tmp_path, capsys):
    write_run(tmp_path / "killed", tail='{"step": 6, "loss": 5.')  # killed mid-write
    assert report.main([str(tmp_path / "killed")]) == 0
    out = capsys.readouterr().out
    assert "torn last line 3" in out
    assert_png(tmp_path / "killed" / "report" / "loss.png")
    write_run(tmp_path / "corrupt", tail='{"step": 6, "lo\n{"step": 8, "loss": 5.0}\n')  # not the last line
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.json").write_text('{"points": [')
    for path, said in ((tmp_path / "corrupt", "metrics.jsonl: line 3 is not JSON"),
                       (tmp_path / "sweep", "results.json: not valid JSON")):
        assert report.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and said in err and err.count("\n") == 1, err
        assert not (path / "report").exists()


def test_report_refuses_an_empty_out_and_says_its_usage(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    assert report.main([str(tmp_path / "run"), "out="]) == 2
    assert capsys.readouterr().err == "error: out='': must name a folder\n"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
    assert report.main(["-h"]) == 0 and "python -m trainer.report PATH" in capsys.readouterr().out


def test_sweep_report_finds_run_dirs_from_any_folder(tmp_path, monkeypatch):
    """run_dir as older sweeps stored it (relative to the sweep's cwd) and after the sweep dir moved (stale absolute)."""
    sweep_dir = tmp_path / "elsewhere" / "sweep"
    write_run(sweep_dir / "00_a")
    write_run(sweep_dir / "01_b", steps=(2, 4, 6))
    points = [{"layout": "a", "nproc": 1, "status": "ok", "tokens_per_s": 1000.0, "run_dir": "sweep/00_a"},
              {"layout": "b", "nproc": 1, "status": "ok", "tokens_per_s": 900.0, "run_dir": "/no/longer/there/01_b"}]
    (sweep_dir / "results.json").write_text(json.dumps({"recipe": "debug", "points": points}))
    monkeypatch.chdir(tmp_path)
    for point in points:  # each way of storing it, alone
        assert report.plot_sweep_losses([point], sweep_dir, tmp_path / "one.png") is not None, point
    written = report.report(sweep_dir)
    assert_png(written.parent / "sweep_loss.png")
