"""Interventions as data: steering, ablation, capture, early exit and resume."""

import numpy as np
import pytest

import emjax
from emjax.models import intervene
from tests.hf_tiny import tiny_hf_model
from tests.numerics import assert_same_computation


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  ref = tiny_hf_model("llama_gqa_tied", seed=5)
  path = tmp_path_factory.mktemp("tiny")
  ref.save_pretrained(path, safe_serialization=True)
  return ref, emjax.load_model(str(path))


IDS = np.asarray([[5, 9, 20, 31, 7, 3, 100, 200], [8, 8, 8, 1, 2, 3, 4, 5]], np.int32)


def test_capture_equals_transformers_hidden_states(pair):
  import torch
  ref, lm = pair
  with torch.no_grad():
    hidden = ref(torch.tensor(IDS, dtype=torch.long), output_hidden_states=True).hidden_states
  got = lm.forward(IDS, capture=(0, 1)).captured
  for layer in (0, 1):
    np.testing.assert_allclose(np.asarray(got[layer]), hidden[layer + 1].numpy(), rtol=1e-5, atol=1e-5)
  early = lm.residuals(IDS, layers=(1,))
  assert_same_computation(early[1], got[1])


def test_resume_from_a_captured_residual_reproduces_the_logits(pair):
  _, lm = pair
  full = np.asarray(lm.logits(IDS))
  h = lm.residuals(IDS, layers=(0,))[0]
  resumed = lm.forward(IDS, residual_in=h, start_layer=1).logits
  np.testing.assert_allclose(np.asarray(resumed), full, atol=1e-5)


def test_zero_strength_steering_is_bitwise_identical(pair):
  _, lm = pair
  direction = np.random.default_rng(0).normal(size=lm.config.hidden_size)
  iv = intervene.with_scale(intervene.steer(lm.config, 1, direction, 3.0), 0.0)
  np.testing.assert_array_equal(np.asarray(lm.logits(IDS, intervention=iv)), np.asarray(lm.logits(IDS)))
  steered = np.asarray(lm.logits(IDS, intervention=intervene.steer(lm.config, 1, direction, 3.0)))
  assert np.abs(steered - np.asarray(lm.logits(IDS))).max() > 1e-2


def test_steering_adds_the_vector_to_the_captured_residual(pair):
  _, lm = pair
  direction = np.random.default_rng(1).normal(size=lm.config.hidden_size).astype(np.float32)
  clean = np.asarray(lm.residuals(IDS, layers=(0,))[0])
  steered = np.asarray(lm.residuals(IDS, layers=(0,), intervention=intervene.steer(lm.config, 0, direction, 2.5))[0])
  np.testing.assert_allclose(steered - clean, np.broadcast_to(2.5 * direction, clean.shape), atol=1e-5)


def test_where_generated_leaves_prompt_positions_alone(pair):
  _, lm = pair
  direction = np.ones(lm.config.hidden_size, np.float32)
  iv = intervene.steer(lm.config, 0, direction, 1.0, where="generated")
  generated = np.zeros(IDS.shape, bool)
  generated[:, -2:] = True
  out = np.asarray(lm.forward(IDS, intervention=iv, generated=generated, capture=(0,), exit_after=0).captured[0])
  clean = np.asarray(lm.residuals(IDS, layers=(0,))[0])
  np.testing.assert_array_equal(out[:, :-2], clean[:, :-2])
  np.testing.assert_allclose(out[:, -2:] - clean[:, -2:], 1.0, atol=1e-5)


def test_ablation_removes_the_direction(pair):
  _, lm = pair
  clean = np.asarray(lm.residuals(IDS, layers=(1,))[1])
  direction = clean.reshape(-1, clean.shape[-1]).mean(0)       # a direction the residual really uses
  unit = direction / np.linalg.norm(direction)
  ablated = np.asarray(lm.residuals(IDS, layers=(1,), intervention=intervene.ablate(lm.config, "all", direction))[1])
  scale = np.linalg.norm(clean, axis=-1).max()
  assert np.abs(clean @ unit).max() > 0.3 * scale
  assert np.abs(ablated @ unit).max() < 1e-5 * scale
  assert np.abs(ablated - clean).max() > 0.1 * scale


def test_interventions_compose(pair):
  _, lm = pair
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(2, lm.config.hidden_size)).astype(np.float32)
  both = intervene.combine(intervene.steer(lm.config, 0, a, 2.0), intervene.steer(lm.config, 0, b, -1.0))
  single = intervene.steer(lm.config, 0, 2.0 * a - b, 1.0)
  np.testing.assert_allclose(np.asarray(lm.logits(IDS, intervention=both)),
                             np.asarray(lm.logits(IDS, intervention=single)), atol=1e-4)
  with_ablation = intervene.combine(both, intervene.ablate(lm.config, 1, a))
  h = np.asarray(lm.residuals(IDS, layers=(1,), intervention=with_ablation)[1])
  assert np.abs(h @ (a / np.linalg.norm(a))).max() < 1e-5 * np.linalg.norm(h, axis=-1).max()


def test_bad_intervention_arguments(pair):
  _, lm = pair
  with pytest.raises(ValueError, match="layer 7 does not exist"):
    intervene.steer(lm.config, 7, np.zeros(lm.config.hidden_size))
  with pytest.raises(ValueError, match="hidden size"):
    intervene.steer(lm.config, 0, np.zeros(5))
  with pytest.raises(ValueError, match="where="):
    intervene.steer(lm.config, 0, np.zeros(lm.config.hidden_size), where="sometimes")
