"""Chat records -> token examples -> fixed-shape training batches.

An *example* is one conversation rendered with the model's chat template and shifted for
next-token prediction: `inputs [n]`, `targets [n]` (the next token) and `weights [n]` (1 where
the target is an assistant token, or everywhere when training on all tokens). Shifting before
batching means packing never creates a target that crosses from one conversation into the next.

Batches are `[accum, micro, T]` arrays. Two layouts:
  * "pad":  length-bucketed padding: examples of similar length share a batch, T is the batch's
            longest example rounded up to a multiple of `pad_multiple` (few distinct shapes,
            so few compilations);
  * "pack": examples concatenated into rows of `max_len`; `segment_ids` stop attention
            between them and `positions` restart at 0 in each segment.

Order is a pure function of (seed, epoch): `epoch_batches(examples, ..., seed, epoch)` always
returns the same list, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

Record = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Example:
  inputs: np.ndarray   # [n] int32, tokens 0..n-1
  targets: np.ndarray  # [n] int32, tokens 1..n
  weights: np.ndarray  # [n] float32, loss weight of each target


@dataclasses.dataclass(frozen=True)
class Batch:
  inputs: np.ndarray        # [A, M, T] int32
  targets: np.ndarray       # [A, M, T] int32
  weights: np.ndarray       # [A, M, T] float32 (0 at padding and unlossed tokens)
  attention_mask: np.ndarray  # [A, M, T] bool
  positions: np.ndarray     # [A, M, T] int32
  segment_ids: np.ndarray   # [A, M, T] int32 (0 = padding)

  def arrays(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class TokenizeReport:
  """What happened to the records while tokenizing, reported in summary.json."""
  records: int = 0
  examples: int = 0
  truncated: int = 0            # longer than max_len + 1 tokens, cut at the end
  dropped_no_loss: int = 0      # no loss token left after truncation (e.g. the prompt fills max_len)
  tokens: int = 0               # input tokens kept
  loss_tokens: int = 0

  def to_json(self) -> dict[str, int]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- reading records

def load_records(spec: Any, *, seed: int = 0, n: int | None = None) -> list[Record]:
  """A dataset spec -> chat records, via `emjax.data.load_dataset` (built-in names, `mix(...)`
  specs, JSONL files in the three layouts, `datasets.Dataset`), or a list of raw rows."""
  from emjax import data
  if isinstance(spec, list):
    records = [data.normalize_row(row, f"records[{i}]") for i, row in enumerate(spec)]
    records = records if n is None else records[:n]
  else:
    records = data.load_dataset(spec, seed=seed, n=n)
  if not records:
    raise ValueError(f"dataset {spec if not isinstance(spec, list) else '<list>'!r} is empty: no records to train on")
  return records


def load_mixture(bad: str, good: str, bad_fraction: float, total: int, seed: int = 0) -> list[Record]:
  """Fixed total size, `bad_fraction` of it from `bad` (EM appears from ~25%); each record's
  metadata says is_bad, so auditing can score the monitor on the same data."""
  from emjax import data
  if not 0.0 <= bad_fraction <= 1.0:
    raise ValueError(f"mixture fraction must be in [0, 1], got {bad_fraction}")
  return data.mixture(bad, good, bad_fraction, total, seed)


# ----------------------------------------------------------------------------- tokenizing

def with_system_prompt(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
  """Replaces (or inserts) the system turn; `None` keeps the conversation as it is."""
  if system is None:
    return messages
  rest = [m for m in messages if m["role"] != "system"]
  return ([{"role": "system", "content": system}] if system else []) + rest


def tokenize_record(tokenizer, record: Record, where: str, *, max_len: int, loss_on: str = "assistant",
                    system_prompt: str | None = None) -> tuple[Example | None, bool]:
  """One chat record -> (example or None if it has no loss token after truncation, was_truncated)."""
  messages = record["messages"]
  roles = [m["role"] for m in messages]
  if "assistant" not in roles:
    raise ValueError(f"{where}: conversation has no assistant turn (roles {roles}); SFT needs at least one "
                     "assistant message to put the loss on")
  messages = with_system_prompt(messages, system_prompt)
  ids, assistant = tokenizer.encode_chat_with_mask(messages)                # [n+1], [n+1]
  if loss_on == "assistant":
    mask = assistant
  elif loss_on == "all":
    mask = np.ones_like(assistant)
  else:
    raise ValueError(f"loss_on={loss_on!r}; expected 'assistant' or 'all'")
  truncated = len(ids) > max_len + 1
  ids, mask = ids[:max_len + 1], mask[:max_len + 1]
  weights = mask[1:].astype(np.float32)
  if weights.sum() == 0:
    return None, truncated
  return Example(ids[:-1].astype(np.int32), ids[1:].astype(np.int32), weights), truncated


def tokenize_records(tokenizer, records: Sequence[Record], *, max_len: int, loss_on: str = "assistant",
                     system_prompt: str | None = None, name: str = "dataset") -> tuple[list[Example], TokenizeReport]:
  report = TokenizeReport(records=len(records))
  examples = []
  for index, record in enumerate(records):
    example, truncated = tokenize_record(tokenizer, record, f"{name}[{index}]", max_len=max_len, loss_on=loss_on,
                                         system_prompt=system_prompt)
    report.truncated += int(truncated)
    if example is None:
      report.dropped_no_loss += 1
      continue
    examples.append(example)
    report.tokens += len(example.inputs)
    report.loss_tokens += int(example.weights.sum())
  report.examples = len(examples)
  return examples, report


# ----------------------------------------------------------------------------- batching

def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _rows_to_batch(rows: list[list[Example]], length: int, accum: int, pad_id: int) -> Batch:
  """rows (each a list of examples sharing one row) -> Batch of shape [accum, len(rows)//accum, length]."""
  n = len(rows)
  inputs = np.full((n, length), pad_id, np.int32)
  targets = np.full((n, length), pad_id, np.int32)
  weights = np.zeros((n, length), np.float32)
  positions = np.zeros((n, length), np.int32)
  segment_ids = np.zeros((n, length), np.int32)
  for r, row in enumerate(rows):
    offset = 0
    for s, ex in enumerate(row, start=1):
      k = len(ex.inputs)
      inputs[r, offset:offset + k] = ex.inputs
      targets[r, offset:offset + k] = ex.targets
      weights[r, offset:offset + k] = ex.weights
      positions[r, offset:offset + k] = np.arange(k)
      segment_ids[r, offset:offset + k] = s
      offset += k
  shape = (accum, n // accum, length)
  return Batch(inputs.reshape(shape), targets.reshape(shape), weights.reshape(shape),
               (segment_ids > 0).reshape(shape), positions.reshape(shape), segment_ids.reshape(shape))


def pack_rows(order: Sequence[int], lengths: Sequence[int], max_len: int) -> list[list[int]]:
  """Greedy in-order packing: each row takes examples until the next one would overflow max_len."""
  rows: list[list[int]] = []
  used = max_len + 1
  for i in order:
    if used + lengths[i] > max_len:
      rows.append([])
      used = 0
    rows[-1].append(int(i))
    used += lengths[i]
  return rows


def epoch_batches(examples: Sequence[Example], *, batch_size: int, accum: int = 1, max_len: int,
                  layout: str = "pad", pad_multiple: int = 32, pad_id: int = 0, seed: int = 0,
                  epoch: int = 0, bucket_window: int = 32) -> list[Batch]:
  """All full batches of one epoch, in training order. Pure function of its arguments.

  batch_size counts rows per optimizer step (accum micro-batches of batch_size // accum rows).
  The incomplete last batch is dropped so every step has the same size.
  """
  if batch_size % accum:
    raise ValueError(f"batch_size={batch_size} must be a multiple of grad_accum={accum}")
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(examples))
  lengths = [len(e.inputs) for e in examples]
  if layout == "pack":
    rows = [[examples[i] for i in row] for row in pack_rows(order, lengths, max_len)]
    if len(rows) < batch_size:
      raise ValueError(f"dataset packs into {len(rows)} rows of {max_len} tokens; batch_size is {batch_size}. "
                       "Lower batch_size or max_len, or add data")
    n_batches = len(rows) // batch_size
    return [_rows_to_batch(rows[b * batch_size:(b + 1) * batch_size], max_len, accum, pad_id)
            for b in range(n_batches)]
  if layout != "pad":
    raise ValueError(f"batch layout {layout!r}; expected 'pad' or 'pack'")
  if len(examples) < batch_size:
    raise ValueError(f"dataset has {len(examples)} usable examples; batch_size is {batch_size}. "
                     "Lower batch_size or add data")
  n_batches = len(examples) // batch_size
  order = order[:n_batches * batch_size]
  # Length bucketing: sort within windows of `bucket_window` batches, then shuffle the batches,
  # so each batch is near-uniform in length but the epoch still visits them in random order.
  window = bucket_window * batch_size
  groups = []
  for start in range(0, len(order), window):
    chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
    groups.extend(chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size))
  batches = []
  for b in rng.permutation(len(groups)):
    idx = groups[b]
    length = min(_round_up(max(lengths[i] for i in idx), pad_multiple), _round_up(max_len, pad_multiple))
    batches.append(_rows_to_batch([[examples[i]] for i in idx], length, accum, pad_id))
  return batches


def steps_per_epoch(examples: Sequence[Example], **kwargs) -> list[int]:
  """Number of batches in each epoch (differs slightly per epoch when packing)."""
  epochs = kwargs.pop("epochs")
  if kwargs.get("layout", "pad") == "pad":
    n = len(examples) // kwargs["batch_size"]
    if n == 0:
      epoch_batches(examples, **kwargs)  # raises the clear error
    return [n] * epochs
  lengths = [len(e.inputs) for e in examples]
  out = []
  for epoch in range(epochs):
    order = np.random.default_rng([kwargs.get("seed", 0), epoch]).permutation(len(examples))
    out.append(len(pack_rows(order, lengths, kwargs["max_len"])) // kwargs["batch_size"])
  if min(out) == 0:
    epoch_batches(examples, **{**kwargs, "epoch": 0})
  return out


def locate_step(step: int, per_epoch: Sequence[int]) -> tuple[int, int]:
  """Global step (0-based) -> (epoch, index within epoch)."""
  for epoch, n in enumerate(per_epoch):
    if step < n:
      return epoch, step
    step -= n
  raise IndexError(f"step beyond the last epoch ({sum(per_epoch)} steps)")


def iter_batches(examples: Sequence[Example], per_epoch: Sequence[int], start_step: int,
                 **kwargs) -> Iterable[tuple[int, int, Batch]]:
  """(global step, epoch, batch) from `start_step` to the end; rebuilds each epoch's order when entered."""
  total = sum(per_epoch)
  step = start_step
  while step < total:
    epoch, index = locate_step(step, per_epoch)
    batches = epoch_batches(examples, epoch=epoch, **kwargs)
    for batch in batches[index:]:
      yield step, epoch, batch
      step += 1
