"""Hugging Face export and import: a trained checkpoint exported (single file and sharded with an index) loads in
transformers' LlamaForCausalLM with the same logits; tied embeddings; only rope exports; `checkpoint.load=hf:DIR`
starts a run from those weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from models import Transformer
from trainer.config import ConfigError, load_config, to_yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ["recipe=debug", "log.every=1", "log.progress=lines", "run.device=cpu", "train.val_batches=0",
        f"data.cache_dir={ROOT / '.cache' / 'ridgeline'}"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_checkpoint(model: Transformer, cfg, folder: Path) -> Path:
    """A committed model-only checkpoint, as a training run would leave it (enough for export and sampling)."""
    dcp.save({"model": model.state_dict()}, checkpoint_id=folder, no_dist=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / "COMMITTED").write_text(json.dumps({"step": 0, "world_size": 1, "files": files}))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run dir after 3 steps of the debug recipe (GQA: 4 heads, 2 kv heads; rope)."""
    from trainer.train import train

    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(load_config(BASE + [f"run.dir={run_dir}", "train.steps=3"]))
    return run_dir


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("max_shard_gb", [5.0, 0.0002])
def test_export_matches_transformers(trained, tmp_path, max_shard_gb):
    from trainer.checkpoint import load_model
    from trainer.export import main

    out = tmp_path / "hf"
    assert main([f"checkpoint={trained}", f"out={out}", f"max_shard_gb={max_shard_gb}"]) == 0
    sharded = max_shard_gb < 1
    assert (out / "model.safetensors.index.json").is_file() == sharded
    assert len(list(out.glob("model-*-of-*.safetensors"))) == (3 if sharded else 0)
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4 and config["eos_token_id"] == 256
    model, _, _ = load_model(trained)
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(hf_logits(out, tokens), ours, atol=1e-4, rtol=0)


def test_export_tied_and_rope_only(tmp_path):
    from trainer.export import export_hf

    cfg = load_config(BASE + ["model.tie_embeddings=true"])
    model = Transformer(cfg.model)
    model.init_weights(7)
    write_checkpoint(model, cfg, tmp_path / "tied")
    out = export_hf(tmp_path / "tied", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    tokens = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, tokens), model.eval()(tokens), atol=1e-4, rtol=0)

    cfg = load_config(BASE + ["model.pos_encoding=alibi"])
    write_checkpoint(Transformer(cfg.model), cfg, tmp_path / "alibi")
    with pytest.raises(ConfigError, match="only rope models"):
        export_hf(tmp_path / "alibi", tmp_path / "hf_alibi")


def test_import_from_hf(trained, tmp_path):
    import torch.nn.functional as F

    from trainer.checkpoint import load_model
    from trainer.data import SampleStream, build_data
    from trainer.export import export_hf, load_hf_weights
    from trainer.train import train

    out = export_hf(trained, tmp_path / "hf", max_shard_gb=0.0002)
    model, cfg, _ = load_model(trained)
    fresh = Transformer(cfg.model)
    load_hf_weights([fresh], out, cfg.model)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="hidden_size=64 there, 128 here"):
        load_hf_weights([fresh], out, load_config(BASE + ["model.dim=128"]).model)

    # A run started from the folder: its first loss is the exported model's loss on the first batch.
    run_dir = tmp_path / "finetune"
    run_cfg = load_config(BASE + [f"run.dir={run_dir}", "train.steps=1", f"checkpoint.load=hf:{out}"])
    train(run_cfg)
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    batch = SampleStream(build_data(run_cfg, None, log=lambda *_: None).train, seed=run_cfg.train.seed).take(0, 8)
    with torch.no_grad():
        expected = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def hf_exports(trained, tmp_path_factory) -> dict[str, Path]:
    """The trained run exported once as a single file and once as 3 shards with an index; tests copy, never edit."""
    from trainer.export import export_hf

    root = tmp_path_factory.mktemp("hf_exports")
    return {"single": export_hf(trained, root / "single"), "sharded": export_hf(trained, root / "sharded",
                                                                                 max_shard_gb=0.0002)}


def _truncate(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(5000)


def _index_naming_wrong_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"  # it lives in shard 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_without_norm(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("export, breakage, message", [
    ("single", lambda d: _truncate(d / "model.safetensors"), "model.safetensors is not a readable safetensors file"),
    ("sharded", lambda d: _truncate(d / "model-00002-of-00003.safetensors"),
     "model-00002-of-00003.safetensors is not a readable safetensors file"),
    ("sharded", lambda d: (d / "model-00003-of-00003.safetensors").unlink(),
     "model-00003-of-00003.safetensors is missing"),
    ("sharded", lambda d: (d / "model.safetensors.index.json").write_text("{not json"),
     "cannot read model.safetensors.index.json"),
    ("sharded", lambda d: (d / "model.safetensors.index.json").write_bytes(b"\xff\xfe"),
     "cannot read model.safetensors.index.json"),
    ("sharded", lambda d: (d / "model.safetensors.index.json").write_text("[]"),
     "model.safetensors.index.json has no weight_map"),
    ("sharded", _index_naming_wrong_shard, "puts model.norm.weight in model-00001-of-00003.safetensors"),
    ("sharded", _index_without_norm, "no tensor model.norm.weight"),  # the last tensor: all others fit first
], ids=["truncated", "truncated_shard", "missing_shard", "garbage_index", "binary_index", "index_not_object",
        "index_wrong_shard", "index_without_tensor"])
def test_import_rejects_broken_folder(hf_exports, tmp_path, export, breakage, message):
    import re
    import shutil

    from trainer.export import load_hf_weights

    folder = Path(shutil.copytree(hf_exports[export], tmp_path / "hf"))
    breakage(folder)
    cfg = load_config(BASE)
    model = Transformer(cfg.model)
    model.init_weights(3)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        load_hf_weights([model], folder, cfg.model)
    assert str(raised.value).startswith(f"checkpoint.load='hf:{folder}': ") and "\n" not in str(raised.value)
    for name, value in model.state_dict().items():  # checked before copying: nothing half-filled
        assert torch.equal(value, before[name]), name


def test_export_out_not_a_folder(trained, tmp_path, capsys):
    from trainer.export import main

    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    outs = [afile, afile / "hf"] + ([Path("/proc/ridgeline-export")] if Path("/proc/self").is_dir() else [])
    for out in outs:
        assert main([f"checkpoint={trained}", f"out={out}"]) == 2, out
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"error: out='{out}': "), captured.err
        assert captured.err.count("\n") == 1, captured.err
    assert afile.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_export_over_earlier_export(trained, hf_exports, tmp_path):
    """Exporting into a folder that holds an export replaces that export's files; other files stay."""
    import shutil

    from trainer.export import INDEX, export_hf

    out = Path(shutil.copytree(hf_exports["single"], tmp_path / "hf"))
    (out / "model-00003-of-00006.safetensors").write_bytes(b"stale shard of a 6-shard export")
    (out / "notes.txt").write_text("keep me")
    export_hf(trained, out, max_shard_gb=0.0002)
    shards = set(json.loads((out / INDEX).read_text())["weight_map"].values())
    assert len(shards) == 3
    assert {p.name for p in out.iterdir()} == shards | {INDEX, "config.json", "notes.txt"}

    export_hf(trained, out)  # and back to one file: no index or shard of the sharded export remains
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "notes.txt"}
    assert (out / "model.safetensors").read_bytes() == (hf_exports["single"] / "model.safetensors").read_bytes()


def test_help(capsys):
    from trainer.export import main

    assert main(["--help"]) == 0 and "checkpoint=PATH out=DIR" in capsys.readouterr().out
