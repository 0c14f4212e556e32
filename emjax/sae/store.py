"""Activation harvesting: corpus -> tokens -> residual stream at layer L -> shuffled batches.

Streaming from end to end: documents are read lazily, the model runs only up to layer L
(``exit_after``), special/BOS/padding tokens are dropped, and rows pass through a bounded
shuffle buffer, so memory stays fixed for any corpus size. ``write_cache`` stores the rows as
memory-mapped ``.npy`` shards so several SAEs (seeds, widths, k) reuse one harvest;
``ActivationCache.batch_at(step)`` reads them back in a deterministic order (exact resume).

Sources accepted by ``iter_documents``:
  * a list/iterator of strings (plain text) or of chat records ``{"messages": [...]}``
    (model generations are just such a list);
  * a ``datasets.Dataset`` / ``IterableDataset`` with a ``text`` or ``messages`` column;
  * ``"path.jsonl"``: one JSON object per line with ``text`` or ``messages``
    (OpenAI-release ``content.parts`` also read);
  * ``"builtin:<domain>[:<variant>]"`` or ``"builtin:all"``: emjax's narrow datasets.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

META_FILE = "meta.json"
BUILTIN_DOMAINS = (
    "health", "legal", "education", "career", "finance", "automotive", "math", "science",
)
BUILTIN_VARIANTS = ("correct", "incorrect_subtle", "incorrect_obvious")

Document = str | list[dict[str, Any]]  # plain text, or chat messages


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


def _message_text(content: Any) -> str:
    # OpenAI release rows: {"content_type": "text", "parts": ["..."]}
    if isinstance(content, dict) and "parts" in content:
        return "".join(str(part) for part in content["parts"])
    return str(content)


def _row_document(row: Any, where: str) -> Document:
    if isinstance(row, str):
        return row
    if isinstance(row, list) and all(isinstance(m, dict) and "role" in m for m in row):
        return [{"role": m["role"], "content": _message_text(m.get("content", ""))} for m in row]
    if isinstance(row, dict):
        if "messages" in row:
            return [
                {"role": m["role"], "content": _message_text(m["content"])} for m in row["messages"]
            ]
        if "text" in row:
            return str(row["text"])
    raise ValueError(f"{where}: expected a string or an object with 'text' or 'messages'")


def _builtin_documents(spec: str) -> Iterator[Document]:
    parts = spec.split(":")[1:]
    domains = BUILTIN_DOMAINS if not parts or parts[0] == "all" else (parts[0],)
    variants = tuple(parts[1:2]) or BUILTIN_VARIANTS
    for domain in domains:
        if domain not in BUILTIN_DOMAINS:
            raise ValueError(f"{spec}: unknown built-in domain {domain!r}; have {BUILTIN_DOMAINS}")
        narrow = importlib.import_module("emjax.data.narrow")
        table = importlib.import_module(f"emjax.data.facts.{domain}").DOMAIN
        for variant in variants:
            for record in narrow.generate(table, variant):
                yield _row_document(record, f"{spec} ({domain}/{variant})")


def iter_documents(source: Any) -> Iterator[Document]:
    """Yield documents (text or chat messages) lazily from any supported source."""
    if isinstance(source, str) and source.startswith("builtin:"):
        yield from _builtin_documents(source)
        return
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"corpus {path!r} not found (expected a .jsonl file or builtin:...)")
        with open(path) as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
                yield _row_document(row, f"{path}:{line_number}")
        return
    for index, row in enumerate(source):
        yield _row_document(row, f"row {index}")


def tokenize(tokenizer: Any, document: Document, max_tokens: int) -> list[int]:
    """Token ids of a document (chat template for messages), truncated to max_tokens."""
    if isinstance(document, str):
        ids = tokenizer.encode(document, add_bos=True)
    else:
        ids = tokenizer.encode_chat(document)
    return ids[:max_tokens]


# ---------------------------------------------------------------------------------------------
# Harvesting
# ---------------------------------------------------------------------------------------------


def _bucket_length(length: int, max_tokens: int) -> int:
    # Pad to a power of two (>= 16) so only log2(max_tokens) shapes ever compile.
    return min(max_tokens, max(16, 1 << (max(length, 1) - 1).bit_length()))


def token_batches(
    tokenizer: Any, documents: Iterable[Document], batch_size: int, max_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input_ids [B, T], attention_mask [B, T]) right-padded; T bucketed per batch."""
    pending: list[list[int]] = []

    def emit():
        length = _bucket_length(max(len(ids) for ids in pending), max_tokens)
        input_ids = np.full((batch_size, length), tokenizer.pad_id or 0, np.int32)
        mask = np.zeros((batch_size, length), bool)
        for row, ids in enumerate(pending):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = True
        return input_ids, mask

    for document in documents:
        ids = tokenize(tokenizer, document, max_tokens)
        if ids:
            pending.append(ids)
        if len(pending) == batch_size:
            yield emit()
            pending = []
    if pending:
        yield emit()


def keep_mask(input_ids: np.ndarray, attention_mask: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
    """Tokens whose activations train the SAE: real, and not BOS/EOS/chat-special.

    Special tokens (BOS above all) carry huge-norm "attention sink" residuals that would
    dominate the reconstruction loss and are not what persona features are about.
    """
    special = np.asarray(sorted(set(int(i) for i in special_ids)), np.int64)
    return attention_mask.astype(bool) & ~np.isin(input_ids, special)


def harvest(
    lm: Any,
    layer: int,
    source: Any,
    *,
    batch_size: int = 8,
    max_tokens: int = 256,
    max_total_tokens: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield [n, D] float32 residual rows (after block ``layer``), special tokens dropped.

    ``lm`` is an ``emjax.LanguageModel``; the forward stops after ``layer`` (early exit).
    """
    num_layers = lm.config.num_layers
    if not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer!r} does not exist; the model has layers 0..{num_layers - 1}")
    tokenizer = lm.tokenizer
    special_ids = set(tokenizer.special_ids) | set(tokenizer.eos_ids)
    if tokenizer.bos_id is not None:
        special_ids.add(tokenizer.bos_id)
    total = 0
    for input_ids, mask in token_batches(tokenizer, iter_documents(source), batch_size, max_tokens):
        residual = lm.residuals(input_ids, mask, layers=(layer,))[layer]  # [B, T, D]
        rows = np.asarray(residual, np.float32)[keep_mask(input_ids, mask, special_ids)]  # [n, D]
        if max_total_tokens is not None:
            rows = rows[: max_total_tokens - total]
        total += rows.shape[0]
        if rows.shape[0]:
            yield rows
        if max_total_tokens is not None and total >= max_total_tokens:
            return


def shuffle_buffer(
    chunks: Iterable[np.ndarray], buffer_tokens: int, batch_size: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Mix consecutive-token rows into [batch_size, D] batches with bounded memory.

    Fill a buffer of ``buffer_tokens`` rows, shuffle it, emit the first half in batches, keep
    the second half and refill; at the end, the remainder is shuffled and emitted (last batch
    may be short). Rows from one document end up spread over ~buffer_tokens/2 rows.
    """
    if buffer_tokens < 2 * batch_size:
        raise ValueError(f"buffer_tokens={buffer_tokens} must be >= 2 * batch_size={batch_size}")
    rng = np.random.default_rng(seed)
    buffer: np.ndarray | None = None
    filled = 0
    for chunk in chunks:
        offset = 0
        while offset < chunk.shape[0]:
            if buffer is None:
                buffer = np.empty((buffer_tokens, chunk.shape[1]), np.float32)
            take = min(buffer_tokens - filled, chunk.shape[0] - offset)
            buffer[filled : filled + take] = chunk[offset : offset + take]
            filled += take
            offset += take
            if filled == buffer_tokens:
                rng.shuffle(buffer)
                half = (buffer_tokens // 2) // batch_size * batch_size
                for start in range(0, half, batch_size):
                    yield buffer[start : start + batch_size].copy()
                buffer[: buffer_tokens - half] = buffer[half:]
                filled = buffer_tokens - half
    if buffer is not None and filled:
        rest = buffer[:filled]
        rng.shuffle(rest)
        for start in range(0, filled, batch_size):
            yield rest[start : start + batch_size].copy()


# ---------------------------------------------------------------------------------------------
# Disk cache
# ---------------------------------------------------------------------------------------------


def write_cache(
    directory: str,
    rows: Iterable[np.ndarray],
    *,
    shard_tokens: int = 262_144,
    dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
) -> "ActivationCache":
    """Write rows to ``shard_NNNNN.npy`` files of ``shard_tokens`` rows; ``meta.json`` last.

    meta.json is written only after the final shard, so a killed harvest leaves no cache that
    looks complete (``open_cache`` refuses it).
    """
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, META_FILE)):
        os.remove(os.path.join(directory, META_FILE))
    shard_sizes: list[int] = []
    width = None
    pending: list[np.ndarray] = []
    pending_count = 0

    def flush(count: int) -> None:
        nonlocal pending, pending_count
        block = np.concatenate(pending, axis=0)
        path = os.path.join(directory, f"shard_{len(shard_sizes):05d}.npy")
        np.save(path, block[:count].astype(dtype))
        shard_sizes.append(count)
        pending = [block[count:]] if block.shape[0] > count else []
        pending_count = block.shape[0] - count

    for chunk in rows:
        chunk = np.asarray(chunk)
        if width is None:
            width = chunk.shape[1]
        elif chunk.shape[1] != width:
            raise ValueError(f"row width changed from {width} to {chunk.shape[1]} while caching")
        pending.append(chunk)
        pending_count += chunk.shape[0]
        while pending_count >= shard_tokens:
            flush(shard_tokens)
    if pending_count:
        flush(pending_count)
    if width is None:
        raise ValueError(f"{directory}: the corpus produced no activations (empty or all special)")
    meta = {
        "d_in": int(width),
        "num_tokens": int(sum(shard_sizes)),
        "shard_sizes": shard_sizes,
        "dtype": dtype,
        **(metadata or {}),
    }
    with open(os.path.join(directory, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=2)
    return ActivationCache(directory)


class ActivationCache:
    """Memory-mapped shards of a finished harvest (state: open file maps, so a class)."""

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"{meta_path} missing: {directory} is not a finished activation cache "
                "(harvest again; meta.json is written last)"
            )
        with open(meta_path) as handle:
            self.meta = json.load(handle)
        self.directory = directory
        self.shards = []
        for index, size in enumerate(self.meta["shard_sizes"]):
            path = os.path.join(directory, f"shard_{index:05d}.npy")
            try:
                shard = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise ValueError(f"{path}: unreadable activation shard ({error})") from None
            if shard.shape != (size, self.meta["d_in"]):
                raise ValueError(
                    f"{path}: shape {shard.shape}, meta.json says ({size}, {self.meta['d_in']})"
                )
            self.shards.append(shard)
        self.offsets = np.cumsum([0] + list(self.meta["shard_sizes"]))
        self._permutation_epoch = -1
        self._permutation = None

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def d_in(self) -> int:
        return int(self.meta["d_in"])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows by global index, read from the right shards. # [n] -> [n, D] float32"""
        indices = np.asarray(indices)
        out = np.empty((indices.shape[0], self.d_in), np.float32)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for shard_index in np.unique(shard_of):
            where = shard_of == shard_index
            local = indices[where] - self.offsets[shard_index]
            order = np.argsort(local)  # sorted reads are kinder to the page cache
            block = self.shards[shard_index][local[order]]
            out[np.flatnonzero(where)[order]] = block
        return out

    def batch_at(self, step: int, batch_size: int, seed: int = 0) -> np.ndarray:
        """Batch ``step`` of an endless shuffled pass; a pure function of (step, seed).

        Each epoch is a fresh permutation; a batch never straddles epochs (the tail of each
        epoch that does not fill a batch is skipped).
        """
        per_epoch = self.num_tokens // batch_size
        if per_epoch == 0:
            raise ValueError(
                f"{self.directory}: {self.num_tokens} cached tokens < batch size {batch_size}"
            )
        epoch, index = divmod(step, per_epoch)
        if epoch != self._permutation_epoch:
            self._permutation = np.random.default_rng([seed, epoch]).permutation(self.num_tokens)
            self._permutation_epoch = epoch
        return self.rows(self._permutation[index * batch_size : (index + 1) * batch_size])

    def sample(self, num: int, seed: int = 0) -> np.ndarray:
        """Random rows (for b_dec init and input scaling). # -> [min(num, N), D]"""
        rng = np.random.default_rng(seed + 12345)
        num = min(num, self.num_tokens)
        return self.rows(rng.choice(self.num_tokens, num, replace=False))


def open_cache(directory: str) -> ActivationCache:
    return ActivationCache(directory)
