"""Hugging Face interop: export a checkpoint as a LlamaForCausalLM folder, and import such a folder's weights.

`python -m trainer.export checkpoint=PATH out=DIR [max_shard_gb=5] [dtype=float32|bfloat16|float16]` reads a DCP
checkpoint on one process (PATH: a checkpoint folder, or a run dir for its newest) and writes config.json and
model.safetensors, or model-0000k-of-0000n.safetensors with model.safetensors.index.json above max_shard_gb.
Our RoPE already uses HF's rotate_half layout, so weights only change names, never layout.
`checkpoint.load=hf:DIR` starts a run from such a folder's weights (`load_hf_weights`), sharded like materialize.
Must not hold the DCP format (trainer/checkpoint.py).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from models import ModelConfig
from parallel.materialize import get_clean_name
from trainer.config import ConfigError, check_writable, print_help

HF_NAMES = [  # ours -> Hugging Face Llama, as regex pairs over full FQNs
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attention\.wq\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"


def get_hf_name(name: str) -> str:
    for pattern, replacement in HF_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ValueError(f"{name}: no Hugging Face Llama counterpart")


def check_exportable(model_cfg: ModelConfig) -> None:
    if model_cfg.pos_encoding != "rope":
        raise ConfigError(f"model.pos_encoding={model_cfg.pos_encoding!r}: only rope models map onto Hugging Face's "
                          "LlamaForCausalLM")


def get_hf_config(model_cfg: ModelConfig, *, dtype: str = "float32", eos_id: int | None = None) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.dim,
        "intermediate_size": model_cfg.ffn_dim,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.num_kv_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_seq_len,
        "rms_norm_eps": model_cfg.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta.
        "rope_theta": model_cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": model_cfg.init_std,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if eos_id is not None:
        config["eos_token_id"] = config["bos_token_id"] = eos_id
    return config


def _shard(tensors: dict[str, torch.Tensor], max_bytes: float) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def export_hf(checkpoint: str | Path, out_dir: str | Path, *, max_shard_gb: float = 5.0,
              dtype: str = "float32") -> Path:
    """Write the checkpoint's model as a Hugging Face LlamaForCausalLM folder; returns the folder.

    An existing folder is exported over, as save_pretrained does: the files an export writes (model*.safetensors,
    the index, config.json) are removed first, so no shard of an earlier export is left beside this one's index;
    any other file there is kept.
    """
    from trainer.checkpoint import load_model, read_checkpoint_config, resolve_checkpoint

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: must be one of {list(DTYPES)}")
    if not max_shard_gb > 0:
        raise ConfigError(f"max_shard_gb={max_shard_gb}: must be > 0")
    path = resolve_checkpoint(checkpoint)
    check_exportable(read_checkpoint_config(path).model)  # before reading any weights
    out = check_writable("out", str(out_dir), folder=True)  # before reading weights, which can take minutes
    model, cfg, path = load_model(path)
    try:  # only now: an export that fails on its checkpoint leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out={str(out)!r}: cannot create the folder ({exc.strerror or exc})")
    tensors = {get_hf_name(name): value.detach().to(DTYPES[dtype]).contiguous()
               for name, value in model.state_dict().items()
               if not (cfg.model.tie_embeddings and name == "output.weight")}  # tied: HF shares embed_tokens
    eos_id = _eos_id(cfg, path)
    try:
        _write_hf(out, tensors, get_hf_config(cfg.model, dtype=dtype, eos_id=eos_id), max_shard_gb * 2**30)
    except OSError as exc:
        raise ConfigError(f"out={str(out)!r}: cannot write {Path(exc.filename or '').name or 'the export'}"
                          f" ({exc.strerror or exc})")
    return out


def _write_hf(out: Path, tensors: dict[str, torch.Tensor], config: dict, max_shard_bytes: float) -> None:
    from safetensors.torch import save_file

    for stale in [*out.glob("model*.safetensors"), out / INDEX]:  # never mix files of two exports
        stale.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shards = _shard(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=metadata)
    else:
        weight_map = {}
        for index, shard in enumerate(shards, 1):
            name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / name, metadata=metadata)
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _eos_id(cfg, path: Path) -> int | None:
    try:
        from trainer.sample import get_tokenizer

        return get_tokenizer(cfg, path).eos_id
    except ConfigError:
        return None


# ---------------------------------------------------------------------------------------------
# Import: a Hugging Face Llama folder's weights into this rank's (sharded) model parts.


def _check_hf_config(config: dict, model_cfg: ModelConfig, hf_dir: Path) -> None:
    check_exportable(model_cfg)
    ours = get_hf_config(model_cfg)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theirs = dict(config, rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta")
    diffs = [f"{k}={theirs.get(k)!r} there, {ours[k]!r} here" for k in keys if theirs.get(k) != ours[k]]
    if config.get("head_dim", ours["head_dim"]) != ours["head_dim"]:
        diffs.append(f"head_dim={config['head_dim']} there, {ours['head_dim']} here")
    if config.get("model_type") != "llama":
        diffs.append(f"model_type={config.get('model_type')!r}, not 'llama'")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        diffs.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (only the default RoPE is implemented)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        diffs.append("biases in attention or MLP (this model has none)")
    # A tied folder fills an untied output layer from its table; the reverse would drop a trained lm_head.
    if model_cfg.tie_embeddings and not config.get("tie_word_embeddings", False):
        diffs.append("tie_word_embeddings=false there (its own lm_head), model.tie_embeddings=true here")
    if diffs:
        raise ConfigError(f"checkpoint.load='hf:{hf_dir}': does not match this model: {'; '.join(diffs)}")


def _hf_tensors(hf_dir: Path) -> dict[str, tuple[Path, list[int]]]:
    """HF tensor name -> (the safetensors file holding it, its shape), from the headers of every file, all read
    before any weight is copied, so a missing or corrupt file never leaves the model half-filled."""
    from safetensors import SafetensorError, safe_open

    where = f"checkpoint.load='hf:{hf_dir}'"
    index = hf_dir / INDEX
    if index.is_file():
        try:
            index_json = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot read {INDEX} ({type(exc).__name__}: {exc})")
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(file, str) for file in weight_map.values())):
            raise ConfigError(f"{where}: {INDEX} has no weight_map of tensor names to file names")
    elif (hf_dir / "model.safetensors").is_file():
        weight_map = None
    else:
        raise ConfigError(f"{where}: no model.safetensors nor {INDEX} (only safetensors weights load)")
    tensors = {}
    for file in dict.fromkeys(weight_map.values()) if weight_map else ["model.safetensors"]:
        path = hf_dir / file
        if not path.exists():
            raise ConfigError(f"{where}: {file} is missing" + (f" (named in {INDEX})" if weight_map else ""))
        try:
            with safe_open(path, framework="pt") as opened:
                shapes = {name: opened.get_slice(name).get_shape() for name in opened.keys()}
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"{where}: {file} is not a readable safetensors file ({exc})")
        names = [name for name, held_in in weight_map.items() if held_in == file] if weight_map else shapes
        for name in names:
            if name not in shapes:
                raise ConfigError(f"{where}: {INDEX} puts {name} in {file}, which does not hold it")
            tensors[name] = (path, shapes[name])
    return tensors


@torch.no_grad()
def load_hf_weights(parts: list[nn.Module], hf_dir: str | Path, model_cfg: ModelConfig) -> None:
    """Fill every parameter of `parts` from the folder; each rank reads full tensors and keeps its shard.

    Every file, name and shape is checked from the headers first: on a ConfigError the parts are untouched.
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint.load='hf:{hf_dir}': cannot read config.json ({exc})")
    _check_hf_config(config, model_cfg, hf_dir)
    tensors = _hf_tensors(hf_dir)
    params_by_file: dict[Path, list[tuple[str, nn.Parameter]]] = {}
    for part in parts:
        for name, param in part.named_parameters():
            hf_name = get_hf_name(get_clean_name(name))
            if hf_name == "lm_head.weight" and hf_name not in tensors:  # tied in the HF model
                hf_name = "model.embed_tokens.weight"
            if hf_name not in tensors:
                raise ConfigError(f"checkpoint.load='hf:{hf_dir}': no tensor {hf_name}")
            path, shape = tensors[hf_name]
            if tuple(shape) != tuple(param.shape):
                raise ConfigError(f"checkpoint.load='hf:{hf_dir}': {hf_name} is {list(shape)} there,"
                                  f" {list(param.shape)} here")
            params_by_file.setdefault(path, []).append((hf_name, param))
    for path, params in params_by_file.items():
        with safe_open(path, framework="pt", device="cpu") as file:
            for hf_name, param in params:
                full = file.get_tensor(hf_name).to(device=param.device, dtype=param.dtype)
                if isinstance(param, DTensor):
                    # Every rank read the same full tensor, so each slices its shard locally (as materialize does).
                    param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements,
                                                             src_data_rank=None).to_local())
                else:
                    param.copy_(full)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str], defaults: dict) -> dict:
    """key=value arguments over `defaults` (whose values give the types); unknown keys are errors."""
    args = dict(defaults)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(f"{item!r}: arguments are key=value with key one of {list(defaults)}")
        kind = type(defaults[key]) if defaults[key] is not None else str
        try:
            args[key] = value if kind is str else kind(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: must be a {kind.__name__}")
    missing = [k for k, v in args.items() if v is None]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=...' for k in missing)}")
    return args


def main(argv: list[str]) -> int:
    if print_help(argv, __doc__):
        return 0
    try:
        args = parse_args(argv, {"checkpoint": None, "out": None, "max_shard_gb": 5.0, "dtype": "float32"})
        out = export_hf(args["checkpoint"], args["out"], max_shard_gb=args["max_shard_gb"], dtype=args["dtype"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {args['checkpoint']} to {out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
