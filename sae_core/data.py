"""Text data for training: load documents, tokenise, chunk to ctx_len, and a deterministic, resumable batch order.

Framework-free (NumPy): both backends draw the same token batches in the same order from the same position, so a
run resumes exactly, on either backend.

Pipeline:
    documents (strings, in a fixed order)  -> tokenise each, append EOS, concatenate
    -> chunks [num_chunks, ctx_len] (int32): each chunk is [BOS] + ctx_len - 1 tokens when the tokenizer has a BOS
       (the trainer excludes BOS from training by default: the first position of a sequence is an attention sink
       whose activation norm is 5-100x the others')
    -> split: sources without a held-out split of their own hold out every 10th chunk (index % 10 == 9) as `test`
    -> batch order: epoch e visits the chunks in `np.random.default_rng([seed, e]).permutation(n)` order,
       batch_size at a time (an incomplete last batch of an epoch is skipped); batch `b` of the run is a pure
       function of (b, seed, batch_size), so the data position saved in a checkpoint is just `b`.

Sources (`load_documents`): `builtin:pydoc` (the English text of `pydoc_data.topics`), a HuggingFace dataset by
name (`datasets.load_dataset`) or a folder saved with `save_to_disk`, a .txt/.md/.rst file, a .jsonl file (one JSON
object per line, text under `text_column`), or a folder of such files (recursively, sorted by path).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .train_config import BUILTIN_DATASET

HOLDOUT_EVERY = 10  # chunk i is held out (split "test") when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
BUILTIN_DATASETS = {BUILTIN_DATASET: "the English text of Python's pydoc_data.topics (offline)"}


@dataclass
class Documents:
    """Texts (or already tokenised sequences) in a fixed order, and whether `split` selected them natively."""
    texts: Iterable[str] | None
    token_ids: Iterable[Sequence[int]] | None = None
    native_split: bool = False  # True: the source had the split itself; no chunk-level holdout is applied
    description: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Loading documents
# ---------------------------------------------------------------------------------------------------------------

def check_dataset(dataset: str) -> None:
    """Fail fast (before a model is loaded) on a built-in name or local path that does not exist."""
    if dataset.startswith("builtin:") and dataset not in BUILTIN_DATASETS:
        raise UserError(f"unknown built-in dataset {dataset!r}; built-in: {', '.join(BUILTIN_DATASETS)}")
    looks_local = dataset.startswith((".", "/", "~")) or dataset.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)
    if looks_local and not Path(dataset).expanduser().exists():
        raise UserError(f"dataset {dataset!r} not found: no such file or folder")


def load_documents(dataset: str, split: str = "train", text_column: str = "text") -> Documents:
    if dataset == BUILTIN_DATASET:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return Documents([topics[key] for key in sorted(topics)], description="pydoc_data.topics")
    if dataset.startswith("builtin:"):
        raise UserError(f"unknown built-in dataset {dataset!r}; built-in: {', '.join(BUILTIN_DATASETS)}")
    path = Path(dataset).expanduser()
    if path.exists():
        return _load_local(path, split, text_column)
    if dataset.startswith((".", "/", "~")) or dataset.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise UserError(f"dataset {dataset!r} not found: no such file or folder")
    return _load_hf(dataset, split, text_column)


def _is_hf_saved(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _load_local(path: Path, split: str, text_column: str) -> Documents:
    if path.is_dir() and _is_hf_saved(path):
        try:
            import datasets
        except ImportError:
            raise UserError("reading a saved HuggingFace dataset needs the `datasets` package: "
                            "pip install datasets") from None
        ds = datasets.load_from_disk(str(path))
        native = False
        if isinstance(ds, datasets.DatasetDict):
            ds, native = _pick_split(ds, split, str(path))
        return _hf_documents(ds, text_column, str(path), native)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
    if not files:
        raise UserError(f"dataset folder {path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")

    def texts():
        for file in files:
            if file.suffix.lower() in JSONL_SUFFIXES:
                yield from _jsonl_texts(file, text_column)
            else:
                yield read_text_file(file)

    return Documents(texts(), description=str(path))


def read_text_file(file: Path) -> str:
    """A text file's contents, refusing what is not text: a binary file named .txt would otherwise be decoded with
    replacement characters and trained on as garbage."""
    raw = file.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        problem = f"it holds NUL bytes (the first at byte {nul})"
    else:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"it is not UTF-8 (invalid byte at position {e.start})"
    raise UserError(f"{file}: not a text file: {problem}. Give UTF-8 text (.txt/.md/.rst), JSON lines (.jsonl) or a "
                    f"saved HuggingFace dataset")


def _jsonl_texts(file: Path, text_column: str) -> Iterator[str]:
    with open(file, "rb") as f:  # streamed: JSON-lines files can be large
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{file}:{number}: not UTF-8 text; give UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise UserError(f"{file}:{number}: not a JSON object ({e})") from None
            if not isinstance(record, dict) or text_column not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{file}:{number}: no {text_column!r} field (found: {keys}); "
                                f"set --text_column to the field holding the text")
            yield str(record[text_column])


def _pick_split(ds_dict, split: str, where: str):
    if split in ds_dict:  # "train" without a test split of its own gives up its every 10th chunk to "test"
        return ds_dict[split], split != "train" or any(s in ds_dict for s in ("test", "validation"))
    if split == "test" and "validation" in ds_dict:
        return ds_dict["validation"], True
    if split == "test" and "train" in ds_dict:
        return ds_dict["train"], False  # held out by chunk index below
    raise UserError(f"{where} has no split {split!r}; it has {', '.join(ds_dict)}")


def _load_hf(name: str, split: str, text_column: str) -> Documents:
    try:
        import datasets
    except ImportError:
        raise UserError(f"dataset {name!r} is not a local file or folder, and loading it from the HuggingFace hub "
                        f"needs the `datasets` package: pip install datasets") from None
    try:
        ds_dict = datasets.load_dataset(name, split=split) if "[" in split else datasets.load_dataset(name)
    except Exception as e:  # DatasetNotFoundError, FileNotFoundError, ConnectionError, ... : all mean "not found"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"dataset {name!r} not found: it is not a local file or folder, and HuggingFace datasets "
                        f"could not load it ({reason[:300]})") from None
    if isinstance(ds_dict, datasets.DatasetDict):
        ds, native = _pick_split(ds_dict, split, name)
    else:  # a sliced split such as "train[:1000]": taken as given
        ds, native = ds_dict, True
    return _hf_documents(ds, text_column, name, native)


def _hf_documents(ds, text_column: str, where: str, native: bool) -> Documents:
    if "input_ids" in ds.column_names:
        return Documents(None, (row["input_ids"] for row in ds), native, where)
    if text_column not in ds.column_names:
        raise UserError(f"{where} has no column {text_column!r} (columns: {', '.join(ds.column_names)}); "
                        f"set --text_column")
    return Documents((row[text_column] for row in ds), None, native, where)


# ---------------------------------------------------------------------------------------------------------------
# Tokenising and chunking
# ---------------------------------------------------------------------------------------------------------------

def tokenize_and_chunk(docs: Documents, tokenizer, ctx_len: int, max_tokens: int | None = None,
                       batch_docs: int = 64) -> np.ndarray:
    """Chunks [num_chunks, ctx_len] int32: documents joined by EOS, each chunk led by BOS if the tokenizer has one.

    Reads documents only until `max_tokens` tokens are chunked (None: all); the tail that does not fill a chunk
    is dropped. `tokenizer` is a HuggingFace tokenizer (callable on a list of strings).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    body = ctx_len - (1 if bos is not None else 0)
    limit_chunks = None if max_tokens is None else math.ceil(max_tokens / ctx_len)
    pieces: list[np.ndarray] = []
    have = 0

    def sequences() -> Iterator[Sequence[int]]:
        if docs.token_ids is not None:
            yield from docs.token_ids
            return
        batch: list[str] = []
        for text in docs.texts:
            batch.append(text)
            if len(batch) == batch_docs:
                yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
                batch = []
        if batch:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]

    for ids in sequences():
        piece = np.asarray(list(ids) + ([eos] if eos is not None else []), dtype=np.int64)
        pieces.append(piece)
        have += len(piece)
        if limit_chunks is not None and have >= limit_chunks * body:
            break
    flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    n = len(flat) // body
    if limit_chunks is not None:
        n = min(n, limit_chunks)
    if n == 0:
        raise UserError(f"{docs.description or 'the dataset'}: too little text for one chunk of ctx_len={ctx_len} "
                        f"tokens ({len(flat)} tokens found)")
    chunks = flat[: n * body].reshape(n, body)
    if bos is not None:
        chunks = np.concatenate([np.full((n, 1), bos, np.int64), chunks], axis=1)
    if chunks.max() > np.iinfo(np.int32).max:
        raise UserError("token ids do not fit in int32")
    return np.ascontiguousarray(chunks, dtype=np.int32)


def select_split(chunks: np.ndarray, split: str, native: bool) -> np.ndarray:
    """Apply the chunk-level holdout for sources without a held-out split of their own."""
    if native or split == "all":
        return chunks
    index = np.arange(len(chunks))
    held_out = index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if split.startswith("test") or split.startswith("validation"):
        picked = chunks[held_out]
    else:
        picked = chunks[~held_out]
    if len(picked) == 0:
        raise UserError(f"split {split!r} is empty: the data has only {len(chunks)} chunk(s) and every "
                        f"{HOLDOUT_EVERY}th is held out for testing; use more text or a smaller ctx_len")
    return picked


def load_token_chunks(dataset: str, split: str, tokenizer, ctx_len: int, max_tokens: int | None = None,
                      text_column: str = "text") -> np.ndarray:
    """Everything above in one call: the token chunks of `split` (at most about max_tokens of them, plus holdout)."""
    docs = load_documents(dataset, split, text_column)
    want = None
    if max_tokens is not None:
        want = max_tokens if docs.native_split else math.ceil(max_tokens * HOLDOUT_EVERY / (HOLDOUT_EVERY - 1))
        if split.startswith("test") and not docs.native_split:
            want = max_tokens * HOLDOUT_EVERY
    chunks = tokenize_and_chunk(docs, tokenizer, ctx_len, want)
    return select_split(chunks, split, docs.native_split)


def fingerprint(chunks: np.ndarray) -> str:
    """A short hash of the token chunks: resume checks that the data is still the same."""
    return hashlib.sha256(np.ascontiguousarray(chunks, dtype=np.int32).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------------------------

class BatchOrder:
    """Deterministic, resumable order of batches over chunk indices, epoch after epoch."""

    def __init__(self, num_chunks: int, batch_size: int, seed: int):
        if num_chunks < batch_size:
            raise UserError(f"batch_size={batch_size} sequences, but the data has only {num_chunks} chunk(s): "
                            f"lower batch_size or ctx_len, or use more text")
        self.num_chunks, self.batch_size, self.seed = num_chunks, batch_size, seed
        self.batches_per_epoch = num_chunks // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, position: int) -> np.ndarray:
        """Chunk indices of batch number `position` (0-based, counted from the start of the run)."""
        epoch, b = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
        return self._perm[b * self.batch_size: (b + 1) * self.batch_size]


def token_batches(chunks: np.ndarray, batch_size: int, seed: int, start: int = 0,
                  stop: int | None = None) -> Iterator[np.ndarray]:
    """Yield token batches [batch_size, ctx_len] from batch number `start` on (until `stop`, else forever)."""
    order = BatchOrder(len(chunks), batch_size, seed)
    position = start
    while stop is None or position < stop:
        yield chunks[order.indices(position)]
        position += 1


def exclude_mask(tokens: np.ndarray, exclude: Sequence[int]) -> np.ndarray:
    """True where a token is trained on."""
    return ~np.isin(tokens, np.asarray(list(exclude), dtype=tokens.dtype)) if len(exclude) else \
        np.ones(tokens.shape, dtype=bool)


def default_exclude_tokens(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


TokenizeFn = Callable[[list[str]], list[list[int]]]
