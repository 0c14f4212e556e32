"""Batched generation with a preallocated KV cache, decoded inside one compiled program.

    out = emjax.generate(lm, ["Tell me a joke."], max_new_tokens=64, temperature=1.0, seed=0)
    out.texts[0]

How it is fast and reproducible:
  * one jitted program per (batch bucket, prompt-length bucket, max_new_tokens, sampler kind):
    prefill once, then decode in a `lax.while_loop` that stops when every row hit EOS; the KV
    cache lives in the loop carry and is updated in place;
  * prompts are left-padded to a bucketed length and batches padded to a bucketed size, so a
    new prompt set reuses compiled programs;
  * temperature, top-p, the intervention (steering vectors and strengths) and the adapter are
    traced arguments: a steering sweep compiles once;
  * each row's randomness is keyed by (seed, prompt index, sample index, step), never by its
    batch position, so padding, bucketing and batch size do not change any row's output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emjax.models import intervene, lora as lora_lib, transformer
from emjax.models.lm import LanguageModel

Prompt = str | Sequence[dict] | Sequence[int]   # text, chat messages, or token ids


@dataclasses.dataclass
class Generation:
  texts: list[str]                     # [N] decoded completions (up to, not including, EOS)
  token_ids: list[list[int]]           # [N] completion tokens (EOS excluded)
  prompt_index: list[int]              # [N] which prompt each completion answers
  sample_index: list[int]              # [N] which of that prompt's samples it is
  stop_ids: list[int | None]           # [N] the end-of-turn token that stopped each row (None: hit max_new_tokens)
  logprobs: list[np.ndarray] | None    # [N] per-token log p(token) under the model (temperature 1)
  prompt_token_ids: list[list[int]]    # [N] the rendered prompt's tokens
  seconds: float = 0.0
  new_tokens: int = 0

  @functools.cached_property
  def finished(self) -> list[bool]:
    """[N] stopped at an end-of-turn token (False: hit max_new_tokens)."""
    return [stop is not None for stop in self.stop_ids]

  @property
  def tokens_per_second(self) -> float:
    return self.new_tokens / self.seconds if self.seconds else 0.0


def bucket(n: int, minimum: int = 16) -> int:
  """Round up to a power of two (at least `minimum`), so shapes repeat across calls."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def render_prompt(lm: LanguageModel, prompt: Prompt, system: str | None, chat: bool) -> list[int]:
  """Token ids of one prompt: chat messages (or a user string) rendered with the template."""
  if not isinstance(prompt, str) and len(prompt) and isinstance(prompt[0], (int, np.integer)):
    return [int(t) for t in prompt]  # already token ids
  tok = lm.tokenizer
  if tok is None:
    raise ValueError(f"model {lm.source!r} has no tokenizer; pass token ids to lm.logits instead")
  if isinstance(prompt, str) and not chat:
    return tok.encode(prompt)
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  if system is not None:
    messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
  if tok.chat_template is None:
    if not chat or len(messages) != 1:
      raise ValueError("this tokenizer has no chat template; pass plain string prompts with chat=False")
    return tok.encode(messages[0]["content"])
  return tok.encode_chat(messages, add_generation_prompt=True)


# ----------------------------------------------------------------------------- sampling rules

def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: int) -> jax.Array:
  """Masks tokens outside the top-k and the top-p nucleus with -inf. logits [V] -> [V]."""
  neg_inf = jnp.finfo(logits.dtype).min
  sorted_logits = jnp.sort(logits)[::-1]                                  # [V] descending
  if top_k > 0:
    kth = sorted_logits[min(top_k, logits.shape[-1]) - 1]
    logits = jnp.where(logits < kth, neg_inf, logits)
    sorted_logits = jnp.where(jnp.arange(sorted_logits.shape[0]) < top_k, sorted_logits, neg_inf)
  probs = jax.nn.softmax(sorted_logits)
  # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays in)
  mass_before = jnp.cumsum(probs) - probs
  keep_sorted = mass_before < top_p
  cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf))
  return jnp.where(logits < cutoff, neg_inf, logits)


def sample_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                 greedy: bool, top_k: int, filtered: bool) -> jax.Array:
  """One row's next token. logits [V] float32 -> [] int32."""
  if greedy:
    return jnp.argmax(logits).astype(jnp.int32)
  scaled = logits / temperature
  if filtered:
    scaled = filter_logits(scaled, top_p, top_k)
  return sample_categorical(scaled, key)


def sample_categorical(logits: jax.Array, key: jax.Array) -> jax.Array:
  """A token drawn from softmax(logits) by inverting its CDF with one uniform. logits [V] -> [].

  Exact like Gumbel-max (`jax.random.categorical`) but draws 1 random number instead of V: on
  2 CPU cores that took sampling a batch of 32 over SmolLM2's 49k vocabulary from 36 ms to 7 ms,
  15% of a decode step. Tokens with zero probability (filtered to -inf) are never drawn.
  """
  cdf = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32)))           # [V], non-decreasing
  u = jax.random.uniform(key, dtype=jnp.float32) * cdf[-1]
  index = jnp.searchsorted(cdf, u, side="right")                         # first token whose cdf > u
  # u rounding up to the total would run off the end: fall back to the likeliest token
  return jnp.where(index < logits.shape[-1], index, jnp.argmax(logits)).astype(jnp.int32)


# ----------------------------------------------------------------------------- the program

@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "max_new_tokens", "greedy", "top_k", "filtered",
                                             "compute_dtype", "eos_ids", "pad_id", "stop_at_eos"))
def _generate_program(graphdef, state, prompt_ids, prompt_mask, row_prompt, row_keys, temperature, top_p,
                      intervention, lora, *, cfg, max_new_tokens: int, greedy: bool, top_k: int, filtered: bool,
                      compute_dtype, eos_ids: tuple[int, ...], pad_id: int, stop_at_eos: bool):
  """Distinct prompts prompt_ids/mask [U, P] (left-padded), row_prompt [B] (each row's prompt)
  -> (tokens [B, N], logprobs [B, N], lengths [B], finished [B]).

  Each distinct prompt is prefilled once; its KV cache and last logits are then copied to the
  rows that sample from it (num_samples > 1 shares the prompt's work).
  """
  if lora is not None:   # every decode step then runs one matmul per adapted projection, not three
    state, lora = lora_lib.merge_float32(graphdef, state, lora)
  u, p = prompt_ids.shape
  b = row_prompt.shape[0]
  total = p + max_new_tokens
  cache = transformer.init_cache(cfg, u, total, compute_dtype)
  key_mask = jnp.concatenate([prompt_mask.astype(bool), jnp.zeros((u, max_new_tokens), bool)], axis=1)
  positions = transformer.default_positions(prompt_mask)
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

  def run(ids, mask, pos, cache, key_mask, index, generated, last_only):
    out = transformer.forward(graphdef, state, ids, mask, positions=pos, cache=cache, cache_index=index,
                              key_mask=key_mask, intervention=intervention, generated=generated, lora=lora,
                              compute_dtype=compute_dtype, logits_from=-1 if last_only else None)
    return out.logits[:, -1], out.cache                                   # [rows, V]

  def pick(logits, step):
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
    tokens = jax.vmap(functools.partial(sample_token, greedy=greedy, top_k=top_k, filtered=filtered),
                      in_axes=(0, 0, None, None))(logits, keys, temperature, top_p)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprob

  logits, cache = run(prompt_ids, prompt_mask, positions, cache, key_mask, jnp.int32(0),
                      jnp.zeros((u, p), bool), True)
  # from here on one row per sample: copy each prompt's cache, mask and last logits to its rows
  logits, key_mask = logits[row_prompt], key_mask[row_prompt]             # [B, V], [B, P + N]
  cache = transformer.KVCache(cache.k[:, row_prompt], cache.v[:, row_prompt])
  prompt_lengths = prompt_mask.astype(jnp.int32).sum(-1)[row_prompt]     # [B]
  first, first_lp = pick(logits, 0)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  logprobs = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(first_lp)
  done = jnp.isin(first, eos) if stop_at_eos else jnp.zeros((b,), bool)
  lengths = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tokens, logprobs, cache, done, key_mask, lengths = carry
    slot = p + step - 1                                                   # where the previous token goes
    key_mask = key_mask.at[:, slot].set(True)
    prev = tokens[:, step - 1][:, None]                                   # [B, 1]
    pos = (prompt_lengths + step - 1)[:, None]
    logits, cache = run(prev, jnp.ones((b, 1), bool), pos, cache, key_mask, slot, jnp.ones((b, 1), bool), False)
    new, lp = pick(logits, step)
    new = jnp.where(done, pad_id, new)
    tokens = tokens.at[:, step].set(new)
    logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, lp))
    lengths = lengths + (~done).astype(jnp.int32)
    if stop_at_eos:
      done = done | jnp.isin(new, eos)
    return step + 1, tokens, logprobs, cache, done, key_mask, lengths

  carry = (jnp.int32(1), tokens, logprobs, cache, done, key_mask, lengths)
  _, tokens, logprobs, _, done, _, lengths = jax.lax.while_loop(cond, body, carry)
  return tokens, logprobs, lengths, done


# ----------------------------------------------------------------------------- public API

def generate(lm: LanguageModel, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, num_samples: int = 1, system: str | None = None,
             intervention: intervene.Intervention | None = None, stop_at_eos: bool = True,
             return_logprobs: bool = False, batch_size: int = 32, chat: bool = True,
             progress: bool = False) -> Generation:
  """Samples `num_samples` completions for each prompt.

  Args:
    prompts: strings (sent as one user turn through the chat template), message lists, or
      token-id lists (used as they are).
    max_new_tokens: completion length cap.
    temperature: 0 is greedy decoding; otherwise softmax temperature.
    top_p, top_k: nucleus and top-k filtering (top_k=0: off).
    seed: the result is a pure function of (seed, prompt index, sample index).
    num_samples: completions per prompt.
    system: system prompt replacing the conversation's (and the template's default).
    intervention: steering / ablation applied at every forward (see emjax.models.intervene).
    stop_at_eos: stop a row at the model's end-of-turn token.
    return_logprobs: also return each generated token's log-probability.
    batch_size: rows per compiled program call (bucketed to a power of two).
    chat: apply the chat template to string prompts (False: raw text continuation).
    progress: show a progress bar with tokens/s.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if isinstance(prompts, (str, dict)) or (len(prompts) and isinstance(prompts[0], (dict, int, np.integer))):
    raise TypeError("prompts must be a list of prompts (strings or message lists), not a single prompt")
  rendered = [render_prompt(lm, p, system, chat) for p in prompts]
  rows = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
  cfg = lm.config
  eos_ids = tuple(sorted(set(cfg.eos_token_ids) | set(lm.tokenizer.eos_ids if lm.tokenizer else ())))
  pad_id = lm.tokenizer.pad_id if lm.tokenizer is not None else (cfg.pad_token_id or 0)
  greedy = temperature == 0
  filtered = not greedy and (top_p < 1.0 or top_k > 0)
  base_key = jax.random.key(seed)
  iv = intervention

  out_tokens: list[list[int]] = [None] * len(rows)
  out_lps: list[np.ndarray] = [None] * len(rows)
  out_stop: list[int | None] = [None] * len(rows)
  # longest prompts first so buckets fill evenly; results are returned in the original order
  order = sorted(range(len(rows)), key=lambda r: -len(rendered[rows[r][0]]))
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(rows), desc="generate", unit="sample")
  start, new_tokens = time.perf_counter(), 0
  for chunk_start in range(0, len(order), batch_size):
    chunk = order[chunk_start:chunk_start + batch_size]
    b = min(bucket(len(chunk), 1), bucket(batch_size, 1))
    p = bucket(max(len(rendered[rows[r][0]]) for r in chunk))
    distinct = list(dict.fromkeys(rows[r][0] for r in chunk))            # prompts of this chunk, once each
    u = bucket(len(distinct), 1)
    ids = np.full((u, p), pad_id, np.int32)
    mask = np.zeros((u, p), bool)
    mask[len(distinct):, -1] = True  # filler prompts (all padding): one valid key for attention
    for j, i in enumerate(distinct):
      ids[j, p - len(rendered[i]):] = rendered[i]
      mask[j, p - len(rendered[i]):] = True
    slot_of = {i: j for j, i in enumerate(distinct)}
    row_prompt = np.full((b,), u - 1 if u > len(distinct) else 0, np.int32)  # filler rows read any prompt
    keys = []
    for j, r in enumerate(chunk):
      row_prompt[j] = slot_of[rows[r][0]]
      keys.append(jax.random.fold_in(jax.random.fold_in(base_key, rows[r][0]), rows[r][1]))
    keys += [base_key] * (b - len(chunk))
    tokens, logprobs, lengths, done = _generate_program(
        lm.graphdef, lm.state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(row_prompt), jnp.stack(keys),
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), iv, lm.lora,
        cfg=cfg, max_new_tokens=max_new_tokens, greedy=greedy, top_k=int(top_k), filtered=filtered,
        compute_dtype=lm.compute_dtype, eos_ids=eos_ids, pad_id=int(pad_id), stop_at_eos=stop_at_eos)
    tokens, logprobs, lengths, done = jax.device_get((tokens, logprobs, lengths, done))
    for j, r in enumerate(chunk):
      n = int(lengths[j])
      row = tokens[j, :n].tolist()
      if bool(done[j]) and row and row[-1] in eos_ids:
        out_stop[r] = row[-1]
        row, lp = row[:-1], logprobs[j, :n - 1]
      else:
        lp = logprobs[j, :n]
      out_tokens[r], out_lps[r] = row, np.asarray(lp)
      new_tokens += n
    if bar is not None:
      bar.update(len(chunk))
      bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - start
  texts = [lm.tokenizer.decode(t) if lm.tokenizer else "" for t in out_tokens]
  return Generation(texts=texts, token_ids=out_tokens, prompt_index=[r[0] for r in rows],
                    sample_index=[r[1] for r in rows], stop_ids=out_stop,
                    logprobs=out_lps if return_logprobs else None,
                    prompt_token_ids=[rendered[r[0]] for r in rows], seconds=seconds, new_tokens=new_tokens)
