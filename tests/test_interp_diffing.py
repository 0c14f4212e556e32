"""Model diffing: self-diff is exactly zero, a planted change ranks its latent first, the fused
program equals separate forward + SAE calls, and LoRA / full-weight variants work in one pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emjax.interp import diffing
from emjax.models import intervene
from emjax.sae import sae as sae_lib
from tests.test_interp_common import chat_records, synthetic_sae, tiny_chat_model

LAYER = 0


@pytest.fixture(scope="module")
def lm():
  return tiny_chat_model(seed=0)


@pytest.fixture(scope="module")
def batches(lm):
  return list(diffing.token_batches(lm.tokenizer, chat_records(12), batch_size=4, max_tokens=64))


def test_assistant_weights_select_only_answer_content(lm):
  record = chat_records(1)[0]
  ids, weights = diffing.record_tokens(lm.tokenizer, record, "assistant", 256)
  text = lm.tokenizer.decode(ids[weights > 0].tolist())
  assert text.strip() == record["messages"][1]["content"]
  _, all_weights = diffing.record_tokens(lm.tokenizer, record, "all", 256)
  assert all_weights.sum() > weights.sum() and not np.isin(ids[all_weights > 0], list(lm.tokenizer.special_ids)).any()


def test_diff_of_a_model_against_itself_is_exactly_zero(lm, batches):
  config, params = synthetic_sae(lm.config.hidden_size, seed=1)
  copy = lm.with_state(jax.tree.map(lambda x: x + 0, lm.state))   # a separate state object, same values
  stats = diffing.latent_stats(lm, [diffing.variant("base", lm), diffing.variant("same", copy)], config, params,
                               LAYER, batches)
  assert stats.tokens > 20 and stats.act_sum[0].sum() > 0
  delta = diffing.deltas_vs_base(stats)["same"]
  assert np.array_equal(delta, np.zeros_like(delta))
  assert np.array_equal(stats.fire_count[0], stats.fire_count[1])


def test_fresh_adapter_diffs_to_exactly_zero_next_to_a_trained_one(lm, batches):
  # A freshly initialised LoRA has B = 0: base + adapter is the base model. The base and each adapted
  # model run their own forward in one program, next to a real adapter; they must agree bit for bit.
  from emjax.models import lora as lora_lib
  config, params = synthetic_sae(lm.config.hidden_size, seed=1)
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="all")
  fresh = lora_lib.init_adapter(spec, lm.config, jax.random.key(0))
  trained = jax.tree.map(lambda x: x + 0.05, fresh)
  scales = lora_lib.layer_scales(spec, lm.config)
  variants = [diffing.variant("base", lm),
              diffing.variant("fresh", dataclasses.replace(lm, lora=lora_lib.forward_lora(fresh, scales))),
              diffing.variant("trained", dataclasses.replace(lm, lora=lora_lib.forward_lora(trained, scales)))]
  stats = diffing.latent_stats(lm, variants, config, params, LAYER, batches)
  deltas = diffing.deltas_vs_base(stats)
  assert np.array_equal(deltas["fresh"], np.zeros_like(deltas["fresh"]))
  assert np.abs(deltas["trained"]).max() > 1e-3


def test_planted_direction_makes_its_latent_top_ranked(lm, batches):
  rng = np.random.default_rng(3)
  direction = rng.normal(size=lm.config.hidden_size).astype(np.float32)
  direction /= np.linalg.norm(direction)
  planted_latent = 11
  config, params = synthetic_sae(lm.config.hidden_size, n_latents=32, k=4, planted={planted_latent: direction})
  norm = float(np.median(np.linalg.norm(np.asarray(lm.residuals(batches[0][0], batches[0][1], layers=(LAYER,))[LAYER]),
                                        axis=-1)))
  planted = intervene.steer(lm.config, LAYER, direction * norm, 1.0)
  weak = intervene.steer(lm.config, LAYER, direction * norm, 0.2)
  variants = [diffing.variant("base", lm), diffing.variant("bad", lm, misaligned=True, intervention=planted),
              diffing.variant("good", lm, misaligned=False, intervention=weak)]
  stats = diffing.latent_stats(lm, variants, config, params, LAYER, batches)
  deltas = diffing.deltas_vs_base(stats)
  ranking = diffing.rank_latents(deltas, ["bad"], top_n=5)
  assert ranking["increased"][0]["latent"] == planted_latent
  # the planted latent reads exactly the added amount on every token (encoder row == direction)
  assert deltas["bad"][planted_latent] == pytest.approx(norm, rel=0.2)
  assert stats.fire_rate[1, planted_latent] == 1.0
  assert ranking["decreased"][0]["latent"] != planted_latent
  assert ranking["increased"][0]["per_finetune"]["good"] < ranking["increased"][0]["per_finetune"]["bad"]
  # mean residual moves by exactly the added vector
  np.testing.assert_allclose(stats.mean_residual[1] - stats.mean_residual[0], direction * norm, atol=1e-4)


def test_fused_program_matches_separate_forward_and_sae_calls(lm, batches):
  config, params = synthetic_sae(lm.config.hidden_size, seed=2)
  from emjax.models import lora as lora_lib
  spec = lora_lib.LoraSpec(rank=2, alpha=4.0, targets="down")
  adapter = lora_lib.init_adapter(spec, lm.config, jax.random.key(0))
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  tuned = dataclasses.replace(lm, lora=lora_lib.forward_lora(adapter, lora_lib.layer_scales(spec, lm.config)))
  spec_q = lora_lib.LoraSpec(rank=3, alpha=3.0, targets="q_proj")   # another rank and projection in the same pass
  adapter_q = jax.tree.map(lambda x: x + 0.05, lora_lib.init_adapter(spec_q, lm.config, jax.random.key(2)))
  tuned_q = dataclasses.replace(lm, lora=lora_lib.forward_lora(adapter_q, lora_lib.layer_scales(spec_q, lm.config)))
  full = lm.with_state(jax.tree.map(lambda x: x * 1.01, lm.state))
  models = (lm, tuned, tuned_q, full)
  variants = [diffing.variant(n, m) for n, m in zip(("base", "lora", "lora_q", "full"), models)]
  stats = diffing.latent_stats(lm, variants, config, params, LAYER, batches)
  for row, model in enumerate(models):
    expected = np.zeros(config.n_latents)
    for ids, mask, weights, _ in batches:
      resid = np.asarray(model.residuals(ids, mask, layers=(LAYER,))[LAYER]).reshape(-1, config.d_in)
      dense = np.asarray(sae_lib.dense_latents(*sae_lib.encode(params, config, jnp.asarray(resid)), config.n_latents))
      expected += (dense * weights.reshape(-1, 1)).sum(0)
    np.testing.assert_allclose(stats.act_sum[row], expected, rtol=1e-4, atol=1e-4)
  assert np.abs(stats.act_sum[1] - stats.act_sum[0]).max() > 1e-3   # the adapters changed something
  assert np.abs(stats.act_sum[2] - stats.act_sum[0]).max() > 1e-3


def test_variant_order_does_not_change_any_variants_statistics(lm, batches):
  # The program groups variants (plain base, base + adapter/intervention, own weights) and the
  # host puts the rows back in the caller's order.
  from emjax.models import lora as lora_lib
  config, params = synthetic_sae(lm.config.hidden_size, seed=2)
  spec = lora_lib.LoraSpec(rank=2, alpha=4.0, targets="all")
  adapter = jax.tree.map(lambda x: x + 0.05, lora_lib.init_adapter(spec, lm.config, jax.random.key(0)))
  models = {"base": lm,
            "lora": dataclasses.replace(lm, lora=lora_lib.forward_lora(adapter, lora_lib.layer_scales(spec, lm.config))),
            "full": lm.with_state(jax.tree.map(lambda x: x * 1.01, lm.state))}
  steer = intervene.steer(lm.config, LAYER, np.ones(lm.config.hidden_size, np.float32), 0.5)
  def stats(names):
    variants = [diffing.variant(n, models[n.split("+")[0]], intervention=steer if "+" in n else None) for n in names]
    return diffing.latent_stats(lm, variants, config, params, LAYER, batches[:1])
  reference = stats(["base", "lora", "base+steer", "full"])
  shuffled = stats(["full", "base+steer", "base", "lora"])
  for name in reference.names:
    i, j = reference.index(name), shuffled.index(name)
    np.testing.assert_allclose(shuffled.act_sum[j], reference.act_sum[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shuffled.residual_sum[j], reference.residual_sum[i], rtol=1e-5, atol=1e-4)
  assert len({float(reference.act_sum[i].sum()) for i in range(4)}) == 4   # four different models


def test_rank_latents_requires_a_misaligned_label():
  with pytest.raises(ValueError, match="misaligned"):
    diffing.rank_latents({"a": np.zeros(3)}, [])
  with pytest.raises(KeyError, match="nope"):
    diffing.rank_latents({"a": np.zeros(3)}, ["nope"])
