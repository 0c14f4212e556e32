"""Model diffing: which SAE latents did a fine-tune turn up (or down)?

For a token batch, the base model and every fine-tune run in *one* compiled program: each
model runs to layer L (early exit), its residual is encoded by the same TopK SAE, and per-latent
sums of activation and firing are accumulated over the selected tokens (assistant tokens, or all
non-special tokens). A fine-tune is one of

  * the base weights plus a LoRA pytree (`lm.lora`, applied unmerged),
  * different full weights (another `state` of the same architecture),
  * the base plus an intervention (a planted change, or a steered model).

    variants = [variant("base", base_lm), variant("bad", bad_lm, misaligned=True), ...]
    stats = latent_stats(base_lm, variants, sae_config, sae_params, layer, batches)
    deltas = stats.mean_act[1:] - stats.mean_act[0]                # [M-1, N]
    ranking = rank_latents(deltas, [v.misaligned for v in variants[1:]], top_n=20)

Why fused: the SAE encode of every model shares one program with the forwards, so nothing of
size [B, T, D] per model leaves the device; only [M, N] sums come back per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emjax.models import intervene, transformer
from emjax.sae import sae as sae_lib

WHERE = ("assistant", "all")


@dataclasses.dataclass
class Variant:
  """One model in a diff: weights (`state`), adapter (`lora`) and/or an intervention."""
  name: str
  state: Any = None                 # nnx.State; None = the base model's weights
  lora: dict | None = None          # forward LoRA pytree or None
  intervention: intervene.Intervention | None = None
  misaligned: bool | None = None    # label used by the ranking and detection (None: unknown)
  metadata: dict = dataclasses.field(default_factory=dict)


def variant(name: str, lm: Any, *, misaligned: bool | None = None, intervention=None, **metadata: Any) -> Variant:
  """A Variant from a LanguageModel. Models that share the base's state object (LoRA fine-tunes
  made with `dataclasses.replace` / `attach_adapter`) pass those weights to the program once."""
  return Variant(name, lm.state, lm.lora, intervention, misaligned, dict(metadata))


@dataclasses.dataclass
class LatentStats:
  names: list[str]              # [M] variant names
  act_sum: np.ndarray           # [M, N] summed latent activation over selected tokens (float64)
  fire_count: np.ndarray        # [M, N] number of selected tokens where the latent fired
  residual_sum: np.ndarray      # [M, D] summed residual at layer L (for mean-difference directions)
  residual_norm_sum: np.ndarray  # [M] summed residual L2 norm
  tokens: float                 # number of selected tokens (same for every variant)

  @property
  def mean_act(self) -> np.ndarray:
    return self.act_sum / max(self.tokens, 1.0)          # [M, N]

  @property
  def fire_rate(self) -> np.ndarray:
    return self.fire_count / max(self.tokens, 1.0)       # [M, N]

  @property
  def mean_residual(self) -> np.ndarray:
    return self.residual_sum / max(self.tokens, 1.0)     # [M, D]

  def index(self, name: str) -> int:
    if name not in self.names:
      raise KeyError(f"no variant named {name!r}; have {self.names}")
    return self.names.index(name)

  def save(self, path: str) -> str:
    np.savez(path, names=np.asarray(self.names), act_sum=self.act_sum, fire_count=self.fire_count,
             residual_sum=self.residual_sum, residual_norm_sum=self.residual_norm_sum, tokens=self.tokens)
    return path

  @classmethod
  def load(cls, path: str) -> "LatentStats":
    data = np.load(path)
    return cls([str(n) for n in data["names"]], data["act_sum"], data["fire_count"], data["residual_sum"],
               data["residual_norm_sum"], float(data["tokens"]))


# ----------------------------------------------------------------------------- token batches

def record_tokens(tokenizer: Any, record: Any, where: str, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """ids [T] and 0/1 weights [T] of the tokens a diff/audit reads in one record.

  Chat records (`{"messages": [...]}` or a message list) weigh their assistant tokens
  (where="assistant") or every non-special token (where="all"); plain text weighs all tokens.
  """
  if where not in WHERE:
    raise ValueError(f"where={where!r}; expected one of {WHERE}")
  messages = record.get("messages") if isinstance(record, dict) else record
  if isinstance(record, str) or (isinstance(record, dict) and "text" in record and messages is None):
    text = record if isinstance(record, str) else record["text"]
    ids = np.asarray(tokenizer.encode(text, add_bos=True), np.int32)
    weights = np.ones(len(ids), np.float32)
  else:
    messages = [{"role": m["role"], "content": _content(m.get("content", ""))} for m in messages]
    ids, assistant = tokenizer.encode_chat_with_mask(messages)
    weights = assistant.astype(np.float32) if where == "assistant" else np.ones(len(ids), np.float32)
  # BOS / end-of-turn / template tokens carry huge "attention sink" residuals that are not about
  # content (and the same ones appear in every record), so they never count.
  special = set(tokenizer.special_ids) | set(tokenizer.eos_ids) | ({tokenizer.bos_id} - {None})
  weights = weights * ~np.isin(ids, np.asarray(sorted(special), np.int64))
  return ids[:max_tokens], weights[:max_tokens]


def _content(content: Any) -> str:
  if isinstance(content, dict) and "parts" in content:  # OpenAI release rows
    return "".join(str(p) for p in content["parts"])
  return str(content)


def _bucket(n: int, max_tokens: int) -> int:
  return min(max_tokens, max(16, 1 << (max(n, 1) - 1).bit_length()))


def token_batches(tokenizer: Any, records: Iterable[Any], *, batch_size: int = 8, max_tokens: int = 256,
                  where: str = "assistant") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]]:
  """Right-padded (ids [B, T], attention_mask [B, T], token weights [B, T], record indices [<=B]).

  T is bucketed to a power of two and B is fixed, so a pass over any corpus compiles a handful
  of shapes. Records with no selected token still take a row (their weights are zero).
  """
  pending: list[tuple[int, np.ndarray, np.ndarray]] = []

  def emit():
    length = _bucket(max(len(ids) for _, ids, _ in pending), max_tokens)
    ids = np.full((batch_size, length), tokenizer.pad_id or 0, np.int32)
    mask = np.zeros((batch_size, length), bool)
    weights = np.zeros((batch_size, length), np.float32)
    for row, (_, row_ids, row_weights) in enumerate(pending):
      ids[row, :len(row_ids)] = row_ids
      mask[row, :len(row_ids)] = True
      weights[row, :len(row_ids)] = row_weights
    return ids, mask, weights, [index for index, _, _ in pending]

  for index, record in enumerate(records):
    ids, weights = record_tokens(tokenizer, record, where, max_tokens)
    if len(ids) == 0:
      continue
    pending.append((index, ids, weights))
    if len(pending) == batch_size:
      yield emit()
      pending = []
  if pending:
    yield emit()


# ----------------------------------------------------------------------------- the fused program

def latent_sums(sae_config: sae_lib.SAEConfig, sae_params: sae_lib.SAEParams, residual: jax.Array,
                weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-latent weighted sums of activation and firing. residual [B, T, D], weights [B, T] -> ([N], [N])."""
  flat = residual.reshape(-1, residual.shape[-1]).astype(jnp.float32)      # [BT, D]
  acts, ids = sae_lib.encode(sae_params, sae_config, flat)                 # [BT, k], [BT, k]
  w = weights.reshape(-1, 1).astype(jnp.float32)                           # [BT, 1]
  n = sae_config.n_latents
  act_sum = jnp.zeros((n,), jnp.float32).at[ids.reshape(-1)].add((acts * w).reshape(-1))
  fire_sum = jnp.zeros((n,), jnp.float32).at[ids.reshape(-1)].add(((acts > 0) * w).reshape(-1))
  return act_sum, fire_sum


def _variant_stats(sae_config, sae_params, residual, weights):
  """One variant's sums from its residual [B, T, D]. -> ([N], [N], [D], [])"""
  residual = residual.astype(jnp.float32)
  act_sum, fire_sum = latent_sums(sae_config, sae_params, residual, weights)
  residual_sum = jnp.einsum("btd,bt->d", residual, weights)
  norm_sum = jnp.sum(jnp.linalg.norm(residual, axis=-1) * weights)
  return act_sum, fire_sum, residual_sum, norm_sum


@functools.partial(jax.jit, static_argnames=("graphdef", "sae_config", "layer", "plain_count", "state_index",
                                             "compute_dtype"))
def _diff_program(graphdef, states, loras, interventions, sae_params, input_ids, attention_mask, weights, *,
                  sae_config, layer: int, plain_count: int, state_index: tuple[int, ...], compute_dtype):
  """Every variant on one batch; returns stacked sums in (plain..., modified...) order.

  Plain variants (the base weights, nothing added) are identical: the base runs once for all of
  them. Every other variant (base + LoRA, base + intervention, own weights `states[state_index[i]]`
  + optional LoRA / intervention) runs its own forward, unrolled in this one program.

  Unrolled beats the alternatives measured on 2 CPU cores (8 x 128 tokens, base + 4 rank-32 LoRA
  fine-tunes, against separate calls): 1.09x, where one vmapped forward over the stacked
  adapters read 1.01x and `lax.map` over them 1.01x; XLA runs the independent forwards' ops side
  by side, and adapters of different ranks need no padding to a common shape.
  -> (act_sum [M, N], fire_sum [M, N], residual_sum [M, D], norm_sum [M])
  """
  def variant_stats(state, lora, iv):
    residual = transformer.forward(graphdef, state, input_ids, attention_mask, capture=(layer,), exit_after=layer,
                                   lora=lora, intervention=iv, compute_dtype=compute_dtype).captured[layer]  # [B, T, D]
    return _variant_stats(sae_config, sae_params, residual, weights)

  outs = [variant_stats(states[0], None, None)] * plain_count
  outs += [variant_stats(states[s], lora, iv) for s, lora, iv in zip(state_index, loras, interventions)]
  return tuple(jnp.stack(parts) for parts in zip(*outs))


def _pack_variants(lm: Any, variants: Sequence[Variant]) -> tuple[list[int], list[int], tuple, tuple[int, ...]]:
  """Positions of the plain variants (the base weights, nothing added) and of the others; the unique
  weight states (the base first, each passed to the program once) and each other variant's index into them."""
  plain, modified, states, state_index = [], [], [lm.state], []
  for i, v in enumerate(variants):
    state = lm.state if v.state is None else v.state
    if state is lm.state and v.lora is None and v.intervention is None:
      plain.append(i)
      continue
    modified.append(i)
    if not any(s is state for s in states):
      states.append(state)
    state_index.append(next(j for j, s in enumerate(states) if s is state))
  return plain, modified, tuple(states), tuple(state_index)


def latent_stats(lm: Any, variants: Sequence[Variant], sae_config: sae_lib.SAEConfig,
                 sae_params: sae_lib.SAEParams, layer: int,
                 batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, Any]]) -> LatentStats:
  """Per-variant latent statistics over `batches` (from `token_batches`), one program per batch shape.

  `lm` supplies the architecture (graphdef), the base weights and the compute dtype.
  """
  if not variants:
    raise ValueError("latent_stats needs at least one variant")
  if sae_config.d_in != lm.config.hidden_size:
    raise ValueError(f"SAE reads width {sae_config.d_in} but the model's hidden size is {lm.config.hidden_size}")
  layer = int(layer) % lm.config.num_layers
  plain, modified, states, state_index = _pack_variants(lm, variants)
  loras = tuple(variants[i].lora for i in modified)
  interventions = tuple(variants[i].intervention for i in modified)
  order = np.argsort(plain + modified)   # variant position -> program output row
  m, n, d = len(variants), sae_config.n_latents, lm.config.hidden_size
  act = np.zeros((m, n)); fire = np.zeros((m, n)); resid = np.zeros((m, d)); norms = np.zeros((m,))
  tokens = 0.0
  for batch in batches:
    ids, mask, weights = batch[0], batch[1], batch[2]
    out = _diff_program(lm.graphdef, states, loras, interventions, sae_params, jnp.asarray(ids), jnp.asarray(mask),
                        jnp.asarray(weights), sae_config=sae_config, layer=layer, plain_count=len(plain),
                        state_index=state_index, compute_dtype=lm.compute_dtype)
    a, f, r, nr = (np.asarray(x)[order] for x in jax.device_get(out))
    act += a; fire += f; resid += r; norms += nr   # float64 on the host: exact enough for any corpus
    tokens += float(np.asarray(weights, np.float64).sum())
  return LatentStats([v.name for v in variants], act, fire, resid, norms, tokens)


# ----------------------------------------------------------------------------- ranking

def deltas_vs_base(stats: LatentStats, base: str | int = 0, what: str = "mean_act") -> dict[str, np.ndarray]:
  """{variant name: [N] change of `what` (mean_act or fire_rate) relative to the base variant}."""
  values = getattr(stats, what)
  b = stats.index(base) if isinstance(base, str) else int(base)
  return {name: values[i] - values[b] for i, name in enumerate(stats.names) if i != b}


def rank_latents(deltas: dict[str, np.ndarray], misaligned: Sequence[str], *, top_n: int = 20,
                 aligned: Sequence[str] = ()) -> dict[str, Any]:
  """Latents ranked by mean delta over the misaligned fine-tunes (ties broken by latent id).

  When `aligned` fine-tunes are given, the score is the misaligned mean minus the aligned mean,
  so latents any fine-tuning turns up (style, format) fall down the list.
  Returns {"increased": [{latent, score, per_finetune}], "decreased": [...], "score": [N]}.
  """
  if not misaligned:
    raise ValueError(f"rank_latents needs at least one fine-tune labelled misaligned; have {sorted(deltas)}")
  for name in list(misaligned) + list(aligned):
    if name not in deltas:
      raise KeyError(f"no deltas for fine-tune {name!r}; have {sorted(deltas)}")
  score = np.mean([deltas[n] for n in misaligned], axis=0)                 # [N]
  if aligned:
    score = score - np.mean([deltas[n] for n in aligned], axis=0)
  order = np.lexsort((np.arange(len(score)), -score))                      # descending, stable
  def entry(i):
    return {"latent": int(i), "score": float(score[i]),
            "per_finetune": {name: float(d[i]) for name, d in deltas.items()}}
  top_n = min(top_n, len(score))
  return {"increased": [entry(i) for i in order[:top_n]],
          "decreased": [entry(i) for i in order[::-1][:top_n]],
          "score": score}


# ----------------------------------------------------------------------------- fine-tunes from files

LABELS = {"misaligned": True, "bad": True, "1": True, "aligned": False, "good": False, "0": False,
          "unknown": None, "": None}


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
  name: str
  path: str                        # adapter directory (adapter_config.json) or a full model source
  misaligned: bool | None = None
  bad_fraction: float | None = None


def parse_finetunes(spec: str) -> list[FinetuneSpec]:
  """'name=path[:label[:bad_fraction]],...' -> specs. label: misaligned|aligned|unknown (or bad|good|1|0)."""
  out = []
  for item in filter(None, (s.strip() for s in (spec or "").split(","))):
    name, sep, rest = item.partition("=")
    if not sep or not name or not rest:
      raise ValueError(f"fine-tune {item!r}: expected name=path[:label[:bad_fraction]]")
    path, *extra = rest.split(":")
    label = extra[0].lower() if extra else ""
    if label not in LABELS:
      raise ValueError(f"fine-tune {item!r}: label {label!r} is not one of misaligned, aligned, unknown")
    try:
      fraction = float(extra[1]) if len(extra) > 1 and extra[1] else None
    except ValueError:
      raise ValueError(f"fine-tune {item!r}: bad_fraction {extra[1]!r} is not a number") from None
    out.append(FinetuneSpec(name, path, LABELS[label], fraction))
  names = [s.name for s in out]
  if len(set(names)) != len(names) or "base" in names:
    raise ValueError(f"fine-tune names must be unique and not 'base'; got {names}")
  return out


def load_finetune(base_lm: Any, spec: FinetuneSpec) -> Any:
  """The fine-tuned LanguageModel: base + adapter (same state object), or full weights of the same shape."""
  from emjax.models import lm as lm_lib
  from emjax.models import lora as lora_lib
  if os.path.isfile(os.path.join(spec.path, lora_lib.ADAPTER_CONFIG)):
    return lora_lib.attach_adapter(base_lm, spec.path)
  tuned = lm_lib.load_model(spec.path, dtype=base_lm.compute_dtype)
  base_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), base_lm.state)
  tuned_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), tuned.state)
  if base_shapes != tuned_shapes:
    raise ValueError(f"fine-tune {spec.name!r} at {spec.path}: weights differ in shape or dtype from the base model "
                     f"{base_lm.source!r}; a diff needs the same architecture (load both with the same --dtype)")
  return tuned


def load_records(spec: str, n: int | None = None, seed: int = 0) -> list[dict]:
  """Chat records of any dataset spec / JSONL; at most `n` of them (a seeded random subset, in order)."""
  from emjax import data as data_lib
  records = data_lib.load_dataset(spec, seed=seed)
  if n is not None and len(records) > n:
    keep = np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False))
    records = [records[int(i)] for i in keep]
  return records


def resolve_latents(spec: str, diff_dir: str | None) -> list[int]:
  """Latents named on a command line: '3,17' -> [3, 17]; 'top:N' -> the N most increased latents in diff_dir/ranking.json."""
  if spec.startswith("top:"):
    if not diff_dir:
      raise ValueError(f"--latents={spec} needs --diff_dir (a diff.py workdir with ranking.json)")
    path = os.path.join(diff_dir, "ranking.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: run experiments/diff.py into {diff_dir} first")
    with open(path) as handle:
      return [int(e["latent"]) for e in json.load(handle)["increased"][:int(spec[4:])]]
  return [int(x) for x in spec.split(",") if x.strip()]
