"""Data loading, chunking, splits, batch order and the activation cache (framework-free, no model needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sae_core.activation_cache import ActivationCache, CacheWriter
from sae_core.data import (BatchOrder, Documents, HOLDOUT_EVERY, exclude_mask, fingerprint, load_documents,
                           load_token_chunks, select_split, token_batches, tokenize_and_chunk)
from sae_core.errors import UserError


class CharTokenizer:
    """Each character is a token (its code point); BOS 1, EOS 2."""
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_builtin_text_is_the_pydoc_topics():
    docs = load_documents("builtin:pydoc")
    texts = list(docs.texts)
    assert len(texts) > 50 and sum(map(len, texts)) > 400_000
    assert texts == list(load_documents("builtin:pydoc").texts)  # a fixed order
    with pytest.raises(UserError, match="unknown built-in dataset"):
        load_documents("builtin:nope")


def test_local_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "c.rst").write_text("gamma")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "delta"}) + "\n\n" + json.dumps({"text": "eps"}) + "\n")
    assert list(load_documents(str(tmp_path / "a.txt")).texts) == ["alpha"]
    assert list(load_documents(str(tmp_path)).texts) == ["alpha", "delta", "eps", "beta", "gamma"]
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match=r"e.jsonl:1: no 'text' field \(found: body\).*--text_column"):
        list(load_documents(str(tmp_path / "e.jsonl")).texts)
    assert list(load_documents(str(tmp_path / "e.jsonl"), text_column="body").texts) == ["x"]
    (tmp_path / "f.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="f.jsonl:1: not a JSON object"):
        list(load_documents(str(tmp_path / "f.jsonl")).texts)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no"):
        load_documents(str(empty))


def test_missing_paths_and_datasets(tmp_path):
    with pytest.raises(UserError, match="not found: no such file or folder"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="not found: no such file or folder"):
        load_documents("./no/such/folder")
    pytest.importorskip("datasets")
    with pytest.raises(UserError, match="dataset 'no-such-org/no-such-dataset' not found"):
        load_documents("no-such-org/no-such-dataset")


def test_saved_hf_dataset_and_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["one", "two"]}),
                               "validation": datasets.Dataset.from_dict({"text": ["three"]})})
    ds.save_to_disk(str(tmp_path / "hf"))
    train = load_documents(str(tmp_path / "hf"), "train")
    assert list(train.texts) == ["one", "two"] and train.native_split
    test = load_documents(str(tmp_path / "hf"), "test")  # no test split: its validation split
    assert list(test.texts) == ["three"] and test.native_split
    with pytest.raises(UserError, match="no split 'dev'; it has train, validation"):
        load_documents(str(tmp_path / "hf"), "dev")
    tokenized = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]})
    tokenized.save_to_disk(str(tmp_path / "tok"))
    chunks = tokenize_and_chunk(load_documents(str(tmp_path / "tok")), CharTokenizer(), ctx_len=3)
    assert chunks.tolist() == [[1, 5, 6], [1, 7, 2], [1, 8, 9]]


def test_chunks_start_with_bos_and_join_documents_with_eos():
    docs = Documents(["abc", "de", "fghij"])
    chunks = tokenize_and_chunk(docs, CharTokenizer(), ctx_len=4)
    flat = [ord(c) for c in "abc"] + [2] + [ord(c) for c in "de"] + [2] + [ord(c) for c in "fghij"] + [2]
    assert chunks.dtype == np.int32 and chunks.shape == (len(flat) // 3, 4)
    assert (chunks[:, 0] == 1).all()
    assert chunks[:, 1:].reshape(-1).tolist() == flat[: len(chunks) * 3]
    limited = tokenize_and_chunk(Documents(["abcdefghijklmnop"] * 10),
                                 CharTokenizer(), ctx_len=4, max_tokens=8)
    assert limited.shape == (2, 4)
    with pytest.raises(UserError, match="too little text"):
        tokenize_and_chunk(Documents(["a"]), CharTokenizer(), ctx_len=64)


def test_holdout_split_is_disjoint_and_prefix_stable():
    chunks = np.arange(95 * 4, dtype=np.int32).reshape(95, 4)
    train, test = select_split(chunks, "train", False), select_split(chunks, "test", False)
    assert len(train) + len(test) == 95 and len(test) == 95 // HOLDOUT_EVERY
    assert not set(train[:, 0]) & set(test[:, 0])
    assert (select_split(chunks, "all", False) == chunks).all()
    # reading more text appends chunks: the held-out ones of a short read stay held out in a long one
    tokenizer = CharTokenizer()
    short = load_token_chunks("builtin:pydoc", "test", tokenizer, 64, max_tokens=2000)
    long = load_token_chunks("builtin:pydoc", "test", tokenizer, 64, max_tokens=20000)
    assert (long[: len(short)] == short).all()
    train_long = load_token_chunks("builtin:pydoc", "train", tokenizer, 64, max_tokens=20000)
    assert not {c.tobytes() for c in train_long} & {c.tobytes() for c in long}


def test_batch_order_is_deterministic_and_resumable():
    chunks = np.arange(23 * 2, dtype=np.int32).reshape(23, 2)
    run = list(token_batches(chunks, 4, seed=3, stop=12))  # 5 batches per epoch: more than two epochs
    assert all(b.shape == (4, 2) for b in run)
    resumed = list(token_batches(chunks, 4, seed=3, start=7, stop=12))
    assert all((a == b).all() for a, b in zip(run[7:], resumed))
    epoch0 = np.concatenate(run[:5])[:, 0] // 2
    assert len(set(epoch0)) == 20  # no chunk twice within an epoch
    other = list(token_batches(chunks, 4, seed=4, stop=5))
    assert any((a != b).any() for a, b in zip(run, other))
    with pytest.raises(UserError, match="only 23 chunk"):
        BatchOrder(23, 32, 0)
    assert fingerprint(chunks) == fingerprint(chunks.copy()) != fingerprint(chunks[::-1])


def test_exclude_mask():
    tokens = np.array([[1, 5, 6], [1, 7, 1]])
    assert exclude_mask(tokens, [1]).tolist() == [[False, True, True], [False, True, False]]
    assert exclude_mask(tokens, []).all()


@pytest.mark.parametrize("transcode", [False, True])
def test_activation_cache_roundtrip_and_resumable_order(tmp_path, transcode):
    rng = np.random.default_rng(0)
    n = 1000
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.normal(size=(n, 3)).astype(np.float32) if transcode else x
    writer = CacheWriter(tmp_path / "c", {"h": (6, 3 if transcode else 6)}, transcode, shard_tokens=300,
                         meta={"model": "m"})
    for start in range(0, n, 170):  # uneven pieces across shard boundaries
        writer.add(np.arange(start, min(start + 170, n)), {"h": (x[start:start + 170], y[start:start + 170])})
    manifest = writer.close()
    assert [s["tokens"] for s in manifest["shards"]] == [300, 300, 300, 100]
    cache = ActivationCache(tmp_path / "c")
    assert cache.total_tokens == n and cache.widths == {"h": (6, 3 if transcode else 6)}
    gen = cache.batches(128, seed=1)
    batches = [next(gen) for _ in range(10)]  # 7 per epoch: crosses an epoch
    epoch = np.concatenate([b["h"][0] for b in batches[:7]])
    rows = {r.tobytes() for r in epoch}
    assert len(rows) == 7 * 128 and rows <= {r.tobytes() for r in x}
    for bx, by in (b["h"] for b in batches):  # x and y rows stay paired
        if transcode:
            index = [np.flatnonzero((x == r).all(1))[0] for r in bx]
            assert (y[index] == by).all()
        else:
            assert by is bx
    later = cache.batches(128, seed=1, start=6)
    for expected in batches[6:]:
        assert (next(later)["h"][0] == expected["h"][0]).all()
    with pytest.raises(UserError, match="already holds an activation cache"):
        CacheWriter(tmp_path / "c", {"h": (6, 6)}, False)


def test_activation_cache_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ActivationCache(tmp_path / "none")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="unfinished harvest"):
        ActivationCache(tmp_path / "half")
    writer = CacheWriter(tmp_path / "small", {"h": (2, 2)}, False)
    writer.add(np.arange(10), {"h": (np.zeros((10, 2), np.float32),) * 2})
    writer.close()
    with pytest.raises(UserError, match="fewer than one batch"):
        next(ActivationCache(tmp_path / "small").batches(64, 0))
