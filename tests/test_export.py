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
