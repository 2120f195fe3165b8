"""Checkpoints: the whole training state through DCP, resumable in any layout.

A checkpoint is <run.dir>/checkpoints/step_XXXXXX/: DCP's files (.metadata and one .distcp per writing rank),
config.yaml (and tokenizer.json for a BPE run) so that export and sampling need nothing else, and COMMITTED,
written last by rank 0 once every rank has finished writing. Only committed checkpoints are loaded or counted
by `checkpoint.keep`; a folder without the marker is a save that never finished.

State, each through a `Stateful`: model and optimizer via torch.distributed.checkpoint.state_dict (keyed by the
original FQNs, so DCP reshards between DP/FSDP/TP/PP layouts and world sizes and pipeline stages merge by name),
the LR scheduler, step, data position and each rank's RNG states. Every value is a tensor, so nothing is pickled
on save; on load the DCP .metadata file is read through an allowlist unpickler.
Must not hold the Hugging Face format (trainer/export.py) or anything the train loop decides.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from models import Transformer
from parallel.mesh import describe_layout
from trainer.config import CheckpointConfig, Config, ConfigError, describe_error, to_yaml
from trainer.faults import NonFiniteError
from trainer.optim import get_stepping_optimizer

CHECKPOINTS = "checkpoints"
MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step_(\d+)$")
HF_PREFIX = "hf:"
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)  # keyed per FQN: PP ranks differ in params
_PART_PREFIX = re.compile(r"^(state\.|param_groups\.)?\d+\.")  # the ModuleList index in front of each FQN
# DCP warns on every save and load without a process group (also from async_save's thread); one process is a
# supported case here, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# ---------------------------------------------------------------------------------------------
# Finding checkpoints.


def get_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def is_committed(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(run_dir: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(step, path) of the committed checkpoints, oldest first, and the folders of unfinished saves."""
    root = Path(run_dir) / CHECKPOINTS
    committed, incomplete = [], []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            (committed.append((int(match.group(1)), path)) if is_committed(path) else incomplete.append(path))
    return sorted(committed), incomplete


def resolve_checkpoint(path: str | Path, *, key: str = "checkpoint") -> Path:
    """A committed checkpoint folder from a checkpoint folder or a run dir (its newest committed checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r}: no such checkpoint")
    if STEP_DIR.match(path.name) or (path / ".metadata").exists() or (path / MARKER).exists():
        if not is_committed(path):
            raise ConfigError(f"{key}={str(path)!r}: incomplete checkpoint (no {MARKER} marker: its save never "
                              "finished); choose a committed one")
        return path
    if (path / CHECKPOINTS).is_dir():
        committed, _ = list_checkpoints(path)
        if not committed:
            raise ConfigError(f"{key}={str(path)!r}: no committed checkpoint under {path / CHECKPOINTS}")
        return committed[-1][1]
    raise ConfigError(f"{key}={str(path)!r}: not a checkpoint folder (no {MARKER}) nor a run dir (no {CHECKPOINTS}/)")


@dataclass
class LoadSource:
    """What a run starts from: a committed DCP checkpoint, Hugging Face weights (hf=True), or nothing."""

    path: Path | None = None
    hf: bool = False
    notes: list[str] = field(default_factory=list)  # logged once on rank 0

    @property
    def resumes(self) -> bool:
        return self.path is not None and not self.hf


def find_load_source(cfg: CheckpointConfig, run_dir: Path) -> LoadSource:
    """The newest committed checkpoint of run_dir, else checkpoint.load (a checkpoint, a run dir or hf:DIR).

    checkpoint.load from elsewhere seeds a run dir without checkpoints; once the run dir holds its own, a restart
    resumes from those, so a job restarted with the same command line continues instead of starting over.
    A checkpoint.load inside run_dir rolls back to it, refused while newer ones exist there.
    """
    committed, incomplete = list_checkpoints(run_dir)
    notes = [f"checkpoint: ignoring {p} (no {MARKER} marker: an unfinished save)" for p in incomplete]
    own, load = (committed[-1][1] if committed else None), cfg.load
    if load and not load.startswith(HF_PREFIX) and Path(load).resolve().parent == (Path(run_dir) / CHECKPOINTS).resolve():
        path = resolve_checkpoint(load, key="checkpoint.load")
        newer = [p.name for step, p in committed if step > _step_of(path)]
        if newer:
            raise ConfigError(f"checkpoint.load={load!r}: run.dir also holds newer checkpoints {newer}; to roll back, "
                              "move those away or continue in another run.dir")
        return LoadSource(path, notes=notes)
    if own is not None and (load or cfg.enabled):
        if load:
            notes.append(f"checkpoint: resuming {own}; checkpoint.load={load!r} only seeds a run dir without checkpoints")
        return LoadSource(own, notes=notes)
    if own is not None:
        notes.append(f"checkpoint.enabled=false: not resuming from {own}")
    if load.startswith(HF_PREFIX):
        hf_dir = Path(load[len(HF_PREFIX):])
        if not (hf_dir / "config.json").is_file():
            raise ConfigError(f"checkpoint.load={load!r}: no config.json in {hf_dir} (not a Hugging Face model folder)")
        return LoadSource(hf_dir, hf=True, notes=notes)
    return LoadSource(resolve_checkpoint(load, key="checkpoint.load") if load else None, notes=notes)


def _step_of(path: Path) -> int:
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else -1


def read_commit_info(path: Path) -> dict:
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {path}: unreadable {MARKER} marker ({exc})")


def read_checkpoint_config(path: Path) -> Config:
    """The run config saved beside a checkpoint (its model section says what the weights are)."""
    file = Path(path) / "config.yaml"
    if not file.is_file():
        raise ConfigError(f"checkpoint {path}: no config.yaml beside it")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(file)))
    except Exception as exc:
        raise ConfigError(f"checkpoint {path}: cannot read config.yaml ({' '.join(str(exc).split())[:200]})")


# ---------------------------------------------------------------------------------------------
# Reading: DCP's FileSystemReader, except that .metadata (a pickle) goes through an allowlist.

_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or module == "torch.distributed.checkpoint.metadata" or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_checkpoint(path: Path, template: dict[str, dict], *, model_cfg) -> Metadata:
    """Fail with one line unless `path` is a committed, intact checkpoint holding every tensor of `template`
    ({stateful name: flat state dict}) with the same global shape."""
    info = read_commit_info(path)
    for name, size in info.get("files", {}).items():
        file = Path(path) / name
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            what = "missing" if actual is None else f"{actual} bytes, {size} when saved"
            raise ConfigError(f"checkpoint {path}: {name} is {what} (corrupted or truncated)")
    try:
        metadata = SafeFileSystemReader(path).read_metadata()
    except Exception as exc:
        raise ConfigError(f"checkpoint {path}: cannot read .metadata (corrupted?): {describe_error(exc)}")
    saved = metadata.state_dict_metadata
    for section, state in template.items():
        for key, value in state.items():
            entry = saved.get(f"{section}.{key}")
            if isinstance(entry, TensorStorageMetadata) and tuple(entry.size) == tuple(value.shape):
                continue
            there = "missing" if entry is None else (list(entry.size) if isinstance(entry, TensorStorageMetadata) else "not a tensor")
            hint = _model_difference(path, model_cfg) if section in ("model", "optimizer") else ""
            raise ConfigError(f"checkpoint {path}: {section}.{key} is {there} there, {list(value.shape)} in this run"
                              + (f"; it was saved for another model ({hint})" if hint else ""))
    return metadata


def _model_difference(path: Path, model_cfg) -> str:
    try:
        saved = read_checkpoint_config(path).model
    except ConfigError:
        return ""
    diffs = [f"model.{k}={getattr(saved, k)!r} there, {v!r} here" for k, v in vars(model_cfg).items()
             if getattr(saved, k, v) != v]
    return ", ".join(diffs)


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _dcp_load(state: dict, path: Path) -> None:
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=_no_dist())
    except (Exception, CheckpointException) as exc:  # CheckpointException derives from BaseException only
        if isinstance(exc, CheckpointException) and exc.failures:  # (exception, traceback) per failed rank
            exc = next(iter(exc.failures.values()))[0]
        raise ConfigError(f"checkpoint {path}: reading failed (corrupted?): {describe_error(exc)}")


def find_nonfinite(states: dict[str, "Stateful"], device: torch.device) -> str:
    """The first entry of `states` (this rank's tensors, DTensor shards included) holding a NaN or Inf, else "";
    the answer is agreed over every rank, which must all call it."""
    found = ""
    for name, state in states.items():
        for key, value in state.state_dict().items():
            if isinstance(value, DTensor):
                value = value.to_local()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                found = f"{name}.{key}"
                break
        if found:
            break
    if not _no_dist():
        flag = torch.tensor(float(bool(found)), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not found:
            found = "a tensor held by another rank"
    return found


# ---------------------------------------------------------------------------------------------
# The state, as Stateful objects holding tensors only.


def _strip_part(key: str) -> str:
    return _PART_PREFIX.sub(lambda m: m.group(1) or "", key, count=1)


def get_plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` without a wrapper subclass (torchao's float8 all-gather wraps FSDP's weight shards), sharing its
    storage: DCP would pickle the subclass into the file, and loading it would then need that library."""
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        plain = get_plain_tensor(local)
        return tensor if plain is local else DTensor.from_local(
            plain, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride())
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor
    inner, _ = tensor.__tensor_flatten__()
    return get_plain_tensor(getattr(tensor, inner[0]))


class ModelState(Stateful):
    """This rank's model parts (pipeline stages), keyed by the FQNs of the full single-device model."""

    def __init__(self, parts: list[nn.Module]):
        # One container so one call covers every stage; its index prefix is stripped from the keys.
        self.container = nn.ModuleList(parts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {_strip_part(k): get_plain_tensor(v) for k, v in get_model_state_dict(self.container).items()}

    def load_state_dict(self, state: dict) -> None:
        names = {_strip_part(k): k for k in get_model_state_dict(self.container)}
        set_model_state_dict(self.container, {names[k]: v for k, v in state.items()})


class OptimizerState(Stateful):
    """The optimizer's per-parameter state (AdamW moments and step counts), keyed by FQN.

    Hyperparameters (param_groups) are not saved: they come from the config, and the learning rate from the
    scheduler's step. Under ZeRO-1 each rank saves the state of its own share of the parameters, with the
    same keys a plain optimizer would use, so DCP can load it into any layout.
    """

    def __init__(self, parts: list[nn.Module], optimizer: torch.optim.Optimizer):
        self.container = nn.ModuleList(parts)
        self.optimizer = get_stepping_optimizer(optimizer)

    def _live(self) -> dict:
        return get_optimizer_state_dict(self.container, self.optimizer, options=_OPTIM_OPTIONS)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {_strip_part(k): v for k, v in self._live().items() if k.startswith("state.")}

    def load_state_dict(self, state: dict) -> None:
        live = self._live()
        names = {_strip_part(k): k for k in live}
        merged = {k: v for k, v in live.items() if k.startswith("param_groups.")}
        merged.update({names[k]: v for k, v in state.items()})
        set_optimizer_state_dict(self.container, self.optimizer, merged, options=_OPTIM_OPTIONS)


class SchedulerState(Stateful):
    """A LambdaLR's position; loading also sets each group's lr exactly as the scheduler's step would."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR), type(scheduler)
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"last_epoch": torch.tensor(self.scheduler.last_epoch, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        s = self.scheduler
        s.last_epoch = int(state["last_epoch"])
        s._step_count = s.last_epoch + 1
        lrs = [base * fn(s.last_epoch) for fn, base in zip(s.lr_lambdas, s.base_lrs)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs


class IntState(Stateful):
    """An object whose state_dict() holds ints (the sample stream: one global position), as int64 tensors."""

    def __init__(self, obj):
        self.obj = obj

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(int(v), dtype=torch.int64) for k, v in self.obj.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.obj.load_state_dict({k: int(v) for k, v in state.items()})


class TrainState(Stateful):
    """The step, and the log window open at a save that is not a log step (a preemption): the summed global
    loss and the trained and skipped steps since the last log line, so the first line after a resume
    averages the same steps as in an uninterrupted run."""

    def __init__(self):
        self.step = 0
        self.window_loss_sum, self.window_trained, self.window_skipped = 0.0, 0, 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64),
                "window_loss_sum": torch.tensor(self.window_loss_sum, dtype=torch.float64),
                "window_trained": torch.tensor(self.window_trained, dtype=torch.int64),
                "window_skipped": torch.tensor(self.window_skipped, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.window_loss_sum = float(state["window_loss_sum"])
        self.window_trained, self.window_skipped = int(state["window_trained"]), int(state["window_skipped"])


class RngState(Stateful):
    """This rank's torch RNG states (byte tensors), under rank-specific keys."""

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"cpu_rank{self.rank}": torch.get_rng_state()}
        if self.device.type == "cuda":
            state[f"cuda_rank{self.rank}"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state[f"cpu_rank{self.rank}"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state[f"cuda_rank{self.rank}"], self.device)


# ---------------------------------------------------------------------------------------------
# The train loop's side: load once, save every `checkpoint.every` steps and at the end.


class Checkpointer:
    """Owns the run's checkpoints: `load` once after the build, `maybe_save` after each step, `close` at the end.

    `logger` is the run's MetricsLogger (info lines on rank 0, and the stall of each save in metrics.jsonl).
    """

    def __init__(self, cfg: Config, run_dir: Path, *, pm, optimizer, scheduler, stream, env, degrees: dict[str, int],
                 logger):
        self.cfg, self.run_dir, self.env, self.logger = cfg, Path(run_dir), env, logger
        self.log = logger.info
        self.layout = describe_layout(cfg.parallel, degrees)
        self.train_state = TrainState()
        self.states: dict[str, Stateful] = {
            "model": ModelState(pm.parts), "optimizer": OptimizerState(pm.parts, optimizer),
            "scheduler": SchedulerState(scheduler), "data": IntState(stream), "train": self.train_state,
            "rng": RngState(env.rank, env.device),
        }
        self.pm = pm
        self.saving = cfg.checkpoint.enabled
        self.loaded_step = -1
        self.pending = None  # (step, path, future, start time) of the async save in flight
        self.group, self.stager = None, None
        self.before_commit = None  # a test hook (trainer/faults.py): called with the step before the marker is written
        if self.saving and cfg.checkpoint.async_save:
            # The background save runs collectives while training runs its own: it needs a group of its own,
            # on a CPU backend (async_save's requirement).
            self.group = dist.new_group(backend="gloo") if not _no_dist() else None
            from torch.distributed.checkpoint.staging import BlockingAsyncStager

            # Copied to host memory while training waits (the stall), then written by a thread. On GPU into
            # pinned buffers allocated at the first save and reused (DefaultStager's reuse failed on torch 2.11).
            self.stager = BlockingAsyncStager(cache_staged_state_dict=env.device.type == "cuda")
        if not self.saving:
            self.log("checkpoint.enabled=false: no checkpoints will be saved")

    # -- load --------------------------------------------------------------------------------

    def load(self, source: LoadSource) -> int:
        """Restore from `source`; returns the step to continue from (0 for a fresh start or an HF import)."""
        for note in source.notes:
            self.log(note)
        if source.path is None:
            return 0
        if source.hf:
            from trainer.export import load_hf_weights

            load_hf_weights(self.pm.parts, source.path, self.cfg.model)
            self.log(f"checkpoint: model weights from Hugging Face folder {source.path}; optimizer and step start fresh")
            return 0
        path = source.path
        states = {k: v for k, v in self.states.items() if k != "rng"}
        info = read_commit_info(path)
        if info.get("world_size") == self.env.world_size and info.get("device") == self.env.device.type:
            states["rng"] = self.states["rng"]
        template = {name: state.state_dict() for name, state in states.items()}
        check_checkpoint(path, template, model_cfg=self.cfg.model)
        _dcp_load(states, path)
        bad = find_nonfinite({"model": states["model"], "optimizer": states["optimizer"]}, self.env.device)
        if bad:  # DCP files carry no checksums: a flipped byte shows up as NaN or Inf at best
            raise ConfigError(f"checkpoint {path}: non-finite values in {bad} (a corrupted file?); move it away to "
                              "resume from the one before")
        step = self.loaded_step = self.train_state.step
        self.log(f"checkpoint: resumed from {path} (step {step}, sample {self.states['data'].obj.position},"
                 f" saved by {info.get('world_size', '?')} process(es): {info.get('layout', '?')})"
                 + ("" if "rng" in states else "; RNG states not restored: saved by another world size or device"))
        if step >= self.cfg.train.steps:
            self.log(f"checkpoint: step {step} >= train.steps={self.cfg.train.steps}: nothing left to train")
        total = read_checkpoint_config(path).train.steps if (path / "config.yaml").is_file() else self.cfg.train.steps
        if total != self.cfg.train.steps and self.cfg.optim.schedule != "constant":
            self.log(f"checkpoint: saved by a run of train.steps={total}, this one has {self.cfg.train.steps}: the "
                     f"{self.cfg.optim.schedule} learning-rate schedule follows the new length from step {step} on")
        return step

    # -- save --------------------------------------------------------------------------------

    def is_due(self, step: int) -> bool:
        every, last = self.cfg.checkpoint.every, step == self.cfg.train.steps
        return self.saving and step != self.loaded_step and (last or bool(every and step % every == 0))

    def maybe_save(self, step: int) -> None:
        """Called after each step: finish an async save that is done, save when due."""
        self._poll()
        if self.is_due(step):
            self.save(step)

    def save(self, step: int) -> None:
        self.wait()
        bad = find_nonfinite({"model": self.states["model"]}, self.env.device)
        if bad:  # the guard skips non-finite updates; this catches what it cannot see (e.g. a corrupted load)
            raise NonFiniteError(f"non-finite values in {bad} at step {step}: not saved, earlier checkpoints kept")
        path = get_checkpoint_dir(self.run_dir, step)
        if self.env.is_main and path.exists():  # an unfinished (or superseded) save of this step
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path)
        if not _no_dist():
            dist.barrier()
        self.train_state.step = step
        start = time.perf_counter()
        if self.stager is not None:
            result = dcp.async_save(self.states, checkpoint_id=path, process_group=self.group,
                                    async_stager=self.stager, no_dist=_no_dist())
            self.pending = (step, path, getattr(result, "upload_completion", result), start)
        else:
            dcp.save(self.states, checkpoint_id=path, no_dist=_no_dist())
        stall = time.perf_counter() - start
        self.logger.log(step, self.cfg.train.steps, {"checkpoint_stall_s": round(stall, 4)}, show=False)
        if self.pending is not None:
            self.log(f"checkpoint: step {step} staged in {stall:.2f} s (training stall); writing {path} in the background")
        else:
            self._commit(step, path, stall)

    def _poll(self) -> None:
        if self.pending is not None and self.pending[2].done():
            self.wait()

    def wait(self) -> None:
        """Wait for the async save in flight (every rank), then commit it (rank 0)."""
        if self.pending is None:
            return
        step, path, future, start = self.pending
        self.pending = None
        future.result()
        self._commit(step, path, time.perf_counter() - start, background=True)

    def _commit(self, step: int, path: Path, seconds: float, *, background: bool = False) -> None:
        # DCP's coordinator writes .metadata only after gathering every rank's write results, and rank 0 is
        # the coordinator: once its save returned, every rank's files are complete.
        if self.before_commit is not None:
            self.before_commit(step)
        if not self.env.is_main:
            return
        config = path / "config.yaml"
        config.write_text(to_yaml(self.cfg))
        tokenizer = self.run_dir / "tokenizer.json"
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, path / "tokenizer.json")
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
        info = {"step": step, "world_size": self.env.world_size, "device": self.env.device.type,
                "layout": self.layout, "files": files, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = path / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.rename(path / MARKER)
        self.log(f"checkpoint: step {step} {'committed' if background else 'saved'} to {path}"
                 f" ({sum(files.values()) / 2**20:.1f} MiB in {seconds:.2f} s{' in the background' if background else ''})")
        self._prune(step)

    def _prune(self, step: int) -> None:
        committed, incomplete = list_checkpoints(self.run_dir)
        old = [p for _, p in committed[:-self.cfg.checkpoint.keep]] + [p for p in incomplete if _step_of(p) < step]
        for path in old:
            (path / MARKER).unlink(missing_ok=True)  # first, so a half-deleted folder never looks complete
            shutil.rmtree(path, ignore_errors=True)
        if old:
            self.log(f"checkpoint: removed {', '.join(p.name for p in old)} (checkpoint.keep={self.cfg.checkpoint.keep})")

    def close(self) -> None:
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None


# ---------------------------------------------------------------------------------------------
# One process, no process group: a checkpoint's weights into a plain model (export, sampling).


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, Config, Path]:
    """The single-device model of a committed checkpoint (or a run dir's newest), its run config and folder."""
    path = resolve_checkpoint(path)
    cfg = read_checkpoint_config(path)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    model.tie_weights()
    state = {"model": model.state_dict()}
    check_checkpoint(path, state, model_cfg=cfg.model)
    _dcp_load(state, path)
    model.init_buffers(torch.device(device))
    return model.eval(), cfg, path
