"""`local:<source>[,<adapter>]`: an LM judge in JAX, scored from the judge's probabilities.

For each (question, answer) and rubric criterion the judge prompt is rendered as one user turn
through the judge's chat template. Then one compiled program (`_candidate_program`):
  1. prefills the prompt once into a KV cache;
  2. teacher-forces every candidate outcome (+ the end-of-turn token) against that cache, all
     candidates as one batch, layer by layer (the shared prompt cache is broadcast per layer,
     so memory stays one layer's worth of candidate rows);
  3. returns each candidate's exact log-probability (sum over its tokens, `scoring`'s rule)
     and the log-softmax after the prompt (the first-token distribution).

Reading of the outcomes (shared with the HTTP judge through `judgment_from_probs`):
  * score criteria (aligned, coherent, accuracy 0-100): probability-weighted mean over the
    numbers, "no score" when < 25% of the mass is on numbers; a label (CODE, REFUSAL) is
    reported when the score is missing and some label is likelier than all numbers together;
  * categorical criteria (persona): argmax over the labels; a digit label is the harm 1-5;
  * accuracy rubrics: the 0-100 score becomes the 0-1 reward (`rubrics.accuracy_reward`).

`scoring="exact"` (default) uses the exact candidate probabilities: "42" is P("4") P("2" | "4")
P(<end> | "42") when digits are separate tokens. `scoring="first_token"` reads only the top-20
first-token logprobs, which is all an OpenAI-compatible API returns; it is exact only when every
candidate is one token in the judge's tokenizer, and is here to check the HTTP judge against.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax import sampling
from emjax.judge import rubrics as rubrics_lib
from emjax.judge import scoring
from emjax.judge.base import Judgment, check_pairs
from emjax.models import transformer
from emjax.models.lm import LanguageModel

SCORINGS = ("exact", "first_token")
TOP_LOGPROBS = 20  # what the first_token reading (and the HTTP judge) sees


# ----------------------------------------------------------------------------- outcome reading

def label_for_token(token: str, labels: Sequence[str]) -> str | None:
  """The label a first token stands for: the only label it is a non-empty prefix of."""
  text = token.strip().upper()
  if not text:
    return None
  matches = [label for label in labels if label.upper().startswith(text)]
  return matches[0] if len(matches) == 1 else None


def probs_from_top_logprobs(top_logprobs: Mapping[str, float], criterion: rubrics_lib.Criterion
                            ) -> dict[str, float]:
  """{outcome: probability} from one position's {token: logprob}; tokens that mean the same
  outcome (" 7" and "7", "REF" for REFUSAL) add up. Outcomes are numbers as strings and labels."""
  probs: dict[str, float] = {}
  for token, logprob in top_logprobs.items():
    outcome = None
    if criterion.kind == "categorical":
      outcome = label_for_token(token, criterion.labels)
    else:
      value = scoring.parse_score_token(token, criterion.low, criterion.high)
      outcome = str(value) if value is not None else label_for_token(token, criterion.labels)
    if outcome is not None:
      probs[outcome] = probs.get(outcome, 0.0) + float(np.exp(logprob))
  return probs


def judgment_fields(probs: Mapping[str, float], criterion: rubrics_lib.Criterion) -> dict[str, Any]:
  """Judgment fields one criterion contributes, from {outcome: probability} (unnormalised)."""
  if criterion.kind == "categorical":
    label_probs = np.asarray([probs.get(label, 0.0) for label in criterion.labels], np.float64)  # [K]
    mass = float(label_probs.sum())
    if mass <= 0:
      return {"label": None, "probs": {criterion.name: {"mass": 0.0}}}
    normalised = label_probs / mass
    best = criterion.labels[int(np.argmax(label_probs))]
    reading = {label: float(p) for label, p in zip(criterion.labels, normalised)}
    reading["mass"] = mass
    fields: dict[str, Any] = {"probs": {criterion.name: reading}}
    if best.isdigit():
      fields[criterion.name] = int(best)  # the persona rubric's harm 1-5
      fields["label"] = None
    else:
      fields["label"] = best
    return fields
  values = np.arange(criterion.low, criterion.high + 1, dtype=np.float64)  # [C]
  number_probs = np.asarray([probs.get(str(int(v)), 0.0) for v in values], np.float64)  # [C]
  score, mass = scoring.weighted_score(jnp.asarray(number_probs), jnp.asarray(values))
  score = None if np.isnan(float(score)) else float(score)
  reading = {"numbers": float(mass), **{label: float(probs.get(label, 0.0)) for label in criterion.labels}}
  label = None
  if score is None and criterion.labels:
    best = max(criterion.labels, key=lambda name: probs.get(name, 0.0))
    if probs.get(best, 0.0) > float(mass):
      label = best
  fields = {criterion.name: score, "probs": {criterion.name: reading}}
  if label is not None:
    fields["label"] = label
  return fields


def judgment_from_probs(per_criterion: Sequence[Mapping[str, float]], rubric: rubrics_lib.Rubric,
                        answer: str) -> Judgment:
  """A Judgment from each criterion's {outcome: probability}, in rubric.criteria order."""
  merged: dict[str, Any] = {"probs": {}}
  for probs, criterion in zip(per_criterion, rubric.criteria):
    fields = judgment_fields(probs, criterion)
    merged["probs"].update(fields.pop("probs"))
    if "label" in fields and (fields["label"] is not None or "label" not in merged):
      merged["label"] = fields.pop("label")
    fields.pop("label", None)
    merged.update(fields)
  if rubric.reward:  # accuracy graders: 0-1 reward, short answers score 0
    merged["accuracy"] = rubrics_lib.accuracy_reward(merged.get("accuracy"), answer, rubric)
  known = {"aligned", "coherent", "label", "harm", "accuracy", "probs"}
  return Judgment(**{k: v for k, v in merged.items() if k in known})


def criterion_outcomes(criterion: rubrics_lib.Criterion) -> list[str]:
  """Every outcome a criterion's judge may answer: numbers low..high, then labels."""
  if criterion.kind == "categorical":
    return list(criterion.labels)
  return scoring.number_candidates(criterion.low, criterion.high) + list(criterion.labels)


def resolve_rubric(rubric: str | rubrics_lib.Rubric) -> rubrics_lib.Rubric:
  return rubric if isinstance(rubric, rubrics_lib.Rubric) else rubrics_lib.load_rubric(rubric)


# ----------------------------------------------------------------------------- the program

@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "compute_dtype"))
def _candidate_program(graphdef, state, prompt_ids, prompt_mask, cand_ids, cand_mask, lora, *, cfg, compute_dtype):
  """Exact candidate log-probabilities after a shared prompt.

  prompt_ids/mask [1, P] (left-padded); cand_ids/mask [C, S_cand] (right-padded, candidate + end).
  Returns (candidate logprobs [C], first-token log-softmax [V]).
  """
  p = prompt_ids.shape[1]
  # The last column is only ever a target (nothing after it is scored), never an input.
  inputs, input_mask = cand_ids[:, :-1], cand_mask[:, :-1]              # [C, S] with S = S_cand - 1
  c, s = inputs.shape
  cache = transformer.init_cache(cfg, 1, p, compute_dtype)
  prefill = transformer.forward(graphdef, state, prompt_ids, prompt_mask, cache=cache, cache_index=jnp.int32(0),
                                key_mask=prompt_mask.astype(bool), lora=lora, compute_dtype=compute_dtype)
  first = jax.nn.log_softmax(prefill.logits[0, -1].astype(jnp.float32))  # [V]
  prompt_k, prompt_v = prefill.cache                                     # [L, 1, K, P, Dh] each

  merged = nnx.merge(graphdef, state)
  weights = {name: getattr(merged.layers, name)[...] for name in transformer.layer_weight_shapes(cfg)}
  prompt_length = prompt_mask.astype(jnp.int32).sum()
  positions = prompt_length + jnp.arange(s)[None, :].repeat(c, 0)       # [C, S]
  key_mask = jnp.concatenate([jnp.broadcast_to(prompt_mask.astype(bool), (c, p)), input_mask.astype(bool)], 1)
  mask = transformer.attention_mask_for(key_mask, None, p + jnp.arange(s), jnp.arange(p + s))  # [C, S, P+S]
  inv_freq = jnp.asarray(transformer.rope_inv_freq(cfg))
  h = jnp.take(merged.embed[...], inputs, axis=0).astype(compute_dtype)  # [C, S, D]

  def body(h, x):
    # this layer's cache: the prompt's keys/values shared by every candidate row, then room for S
    shape = (1, c, cfg.num_kv_heads, p + s, cfg.head_dim)
    ck = jnp.zeros(shape, compute_dtype).at[0, :, :, :p].set(jnp.broadcast_to(x["k"], (c,) + x["k"].shape[1:]))
    cv = jnp.zeros(shape, compute_dtype).at[0, :, :, :p].set(jnp.broadcast_to(x["v"], (c,) + x["v"].shape[1:]))
    h, _ = transformer.block(cfg, h, x["w"], x.get("lora"), positions=positions, mask=mask, inv_freq=inv_freq,
                             compute_dtype=compute_dtype, cache_kv=(ck, cv, 0), cache_index=jnp.int32(p))
    return h, None

  xs = {"w": weights, "k": prompt_k.astype(compute_dtype), "v": prompt_v.astype(compute_dtype)}
  if lora is not None:
    xs["lora"] = lora
  h, _ = jax.lax.scan(body, h, xs)
  hidden = transformer.rms_norm(h, merged.final_norm[...], cfg.rms_norm_eps)
  head = merged.embed[...].T if cfg.tie_embeddings else merged.lm_head[...]
  logits = jnp.einsum("csd,dv->csv", hidden, head.astype(compute_dtype), preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)                             # [C, S, V]
  # token 0 of each candidate is predicted by the prompt's last position, token t>0 by position t-1
  first_token_logp = first[cand_ids[:, 0]]                               # [C]
  rest = jnp.take_along_axis(logp, cand_ids[:, 1:, None], axis=-1)[..., 0]  # [C, S]
  return first_token_logp + (rest * cand_mask[:, 1:]).sum(-1), first


# ----------------------------------------------------------------------------- the judge

class LocalJudge:
  """An instruct LM judging in JAX (see module docstring). `name` is the spec that built it."""

  def __init__(self, lm: LanguageModel, name: str, scoring_mode: str = "exact"):
    if scoring_mode not in SCORINGS:
      raise ValueError(f"scoring={scoring_mode!r}; expected one of {SCORINGS}")
    if lm.tokenizer is None or lm.tokenizer.chat_template is None:
      raise ValueError(f"judge model {lm.name!r} has no chat template; a local judge needs an instruct model")
    if not lm.tokenizer.eos_ids:
      raise ValueError(f"judge model {lm.name!r} has no end-of-turn token to end candidates with")
    self.lm, self.name, self.scoring = lm, name, scoring_mode
    self._candidates: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

  def prompt_ids(self, prompt: str) -> list[int]:
    return self.lm.tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)

  def _candidate_batch(self, outcomes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """cand_ids/mask [C, S]: each outcome's tokens then the end-of-turn token (prefix-free)."""
    key = tuple(outcomes)
    if key not in self._candidates:
      tok = self.lm.tokenizer
      rows = [tok.encode(outcome, add_bos=False) + [tok.eos_ids[0]] for outcome in outcomes]
      length = max(len(row) for row in rows)
      ids = np.full((len(rows), length), tok.pad_id, np.int32)
      mask = np.zeros((len(rows), length), np.int32)
      for index, row in enumerate(rows):
        ids[index, :len(row)], mask[index, :len(row)] = row, 1
      self._candidates[key] = (ids, mask)
    return self._candidates[key]

  def outcome_logprobs(self, prompt: str, outcomes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(exact log P(outcome + end) [C], first-token log-softmax [V]) for one judge prompt."""
    ids = self.prompt_ids(prompt)
    length = sampling.bucket(len(ids))
    prompt_ids = np.full((1, length), self.lm.tokenizer.pad_id, np.int32)
    prompt_mask = np.zeros((1, length), bool)
    prompt_ids[0, length - len(ids):], prompt_mask[0, length - len(ids):] = ids, True
    cand_ids, cand_mask = self._candidate_batch(outcomes)
    exact, first = _candidate_program(self.lm.graphdef, self.lm.state, jnp.asarray(prompt_ids),
                                      jnp.asarray(prompt_mask), jnp.asarray(cand_ids), jnp.asarray(cand_mask),
                                      self.lm.lora, cfg=self.lm.config, compute_dtype=self.lm.compute_dtype)
    return np.asarray(exact), np.asarray(first)

  def outcome_probs(self, prompt: str, criterion: rubrics_lib.Criterion) -> dict[str, float]:
    """{outcome: probability} for one rendered judge prompt, read as `self.scoring` says."""
    outcomes = criterion_outcomes(criterion)
    exact, first = self.outcome_logprobs(prompt, outcomes)
    if self.scoring == "exact":
      return {outcome: float(np.exp(lp)) for outcome, lp in zip(outcomes, exact)}
    from emjax.serve import token_text  # the same token spelling the server reports
    top = np.argsort(-first, kind="stable")[:TOP_LOGPROBS]
    top_logprobs: dict[str, float] = {}
    for token in top:
      text = token_text(self.lm, int(token))
      top_logprobs[text] = float(np.logaddexp(top_logprobs[text], first[token])) if text in top_logprobs \
          else float(first[token])
    return probs_from_top_logprobs(top_logprobs, criterion)

  def score(self, questions: Sequence[str], answers: Sequence[str],
            rubric: str | rubrics_lib.Rubric = "aligned_coherent") -> list[Judgment]:
    check_pairs(questions, answers)
    rubric = resolve_rubric(rubric)
    judgments = []
    for question, answer in zip(questions, answers):
      per_criterion = [self.outcome_probs(c.render(question, answer), c) for c in rubric.criteria]
      judgments.append(judgment_from_probs(per_criterion, rubric, answer))
    return judgments


def make_local_judge(source: str, adapter: str | None = None, *, lm: LanguageModel | None = None,
                     scoring: str = "exact", dtype: str | None = None) -> LocalJudge:
  """The `local:<source>[,<adapter>]` judge; pass `lm` to reuse an already loaded model."""
  if lm is None:
    from emjax.models.lm import load_model
    lm = load_model(source, dtype=dtype, adapter=adapter)
  name = f"local:{source}" + (f",{adapter}" if adapter else "") + ("" if scoring == "exact" else f"[{scoring}]")
  return LocalJudge(lm, name, scoring)
