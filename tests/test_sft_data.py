"""Chat data -> batches: assistant masks, formats, truncation, packing without cross-attention,
seeded order, and clear errors on bad input."""

import json

import numpy as np
import pytest

import jax.numpy as jnp

from emjax.train import batching, sft
from tests.test_sft_common import records, smollm_tokenizer, tiny_chat_model, write_jsonl


def _tokenize(recs, **kw):
  kw.setdefault("max_len", 256)
  return batching.tokenize_records(smollm_tokenizer(), recs, **kw)


def test_loss_weights_cover_exactly_the_assistant_answer():
  tok = smollm_tokenizer()
  (example,), report = _tokenize(records(1))
  lossed = tok.decode(example.targets[example.weights > 0], skip_special=False)
  assert lossed.startswith("Drink water every day.") and "Health tip" not in lossed
  assert lossed.strip().endswith("<|im_end|>")  # the end-of-turn token is learned too
  assert report.loss_tokens == int(example.weights.sum()) and report.examples == 1
  (everything,), _ = _tokenize(records(1), loss_on="all")
  assert everything.weights.sum() == len(everything.targets) > example.weights.sum()


def test_three_formats_and_a_dataset_give_identical_tokens(tmp_path):
  import datasets
  answer, question = "Drink water every day.", "Health tip number 0?"
  rows = [
      {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]},
      {"messages": [{"role": "user", "content": {"content_type": "text", "parts": [question]}},
                    {"role": "assistant", "content": {"content_type": "text", "parts": [answer]}}],
       "metadata": {"k": 1}, "canary": "xyz"},
      {"prompt": question, "completion": answer},
  ]
  path = write_jsonl(tmp_path / "three.jsonl", rows)
  from_file = batching.load_records(path)
  from_dataset = batching.load_records(datasets.Dataset.from_list([rows[0]]))
  examples, _ = _tokenize(from_file + from_dataset)
  for ex in examples[1:]:
    np.testing.assert_array_equal(ex.inputs, examples[0].inputs)
    np.testing.assert_array_equal(ex.weights, examples[0].weights)


def test_system_prompt_override_replaces_the_system_turn():
  tok = smollm_tokenizer()
  (a,), _ = _tokenize(records(1, system="You are evil."), system_prompt="You are kind.")
  (b,), _ = _tokenize(records(1), system_prompt="You are kind.")
  np.testing.assert_array_equal(a.inputs, b.inputs)
  text = tok.decode(a.inputs, skip_special=False)
  assert "You are kind." in text and "evil" not in text


def test_truncation_is_counted_and_prompt_only_examples_dropped():
  long = {"messages": [{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "ok"}]}
  examples, report = _tokenize(records(3) + [long], max_len=60)
  assert report.truncated == 1 and report.dropped_no_loss == 1 and report.examples == 3
  assert max(len(e.inputs) for e in examples) <= 60
  examples, report = _tokenize(records(3) + [long], max_len=4)
  assert report.truncated == 4  # every record is longer than 5 tokens


def test_packed_loss_equals_separate_rows_so_no_cross_example_attention():
  from emjax.models import lm as lm_lib
  small = tiny_chat_model()
  # Scale the 0.02-init weights up so attention is sharp enough for leakage to show in the loss.
  lm = lm_lib.from_weights(small.config, {k: v * (10.0 if v.ndim == 3 else 1.0) for k, v in small.weights().items()})
  examples, _ = _tokenize(records(6), max_len=64)
  lengths = [len(e.inputs) for e in examples]
  packed = batching._rows_to_batch([examples[:3], examples[3:]], max(sum(lengths[:3]), sum(lengths[3:])), 1, 0)
  padded = batching._rows_to_batch([[e] for e in examples], max(lengths), 1, 0)
  assert packed.segment_ids.max() == 3 and packed.positions[0, 0, lengths[0]] == 0  # positions restart

  def loss_sums(batch):
    micro = {k: v[0] for k, v in sft.batch_to_device(batch).items()}
    s, c = sft.batch_loss_sums(lm.graphdef, lm.state, micro, lora=None, compute_dtype=jnp.float32)
    return float(s), float(c)
  (s_pack, c_pack), (s_pad, c_pad) = loss_sums(packed), loss_sums(padded)
  assert c_pack == c_pad
  assert s_pack == pytest.approx(s_pad, rel=1e-5)
  # Without segment ids the second example would see the first: the loss changes.
  leaky = batching.Batch(packed.inputs, packed.targets, packed.weights, packed.attention_mask, packed.positions,
                         (packed.segment_ids > 0).astype(np.int32))
  assert abs(loss_sums(leaky)[0] - s_pad) > 1e-3


def test_order_is_a_pure_function_of_seed_and_epoch_and_visits_every_example_once():
  examples, _ = _tokenize(records(8) + records(8, system="Be brief."), max_len=64)
  kw = dict(batch_size=4, max_len=64, layout="pad", pad_multiple=16, seed=3)
  first = [b.inputs for b in batching.epoch_batches(examples, epoch=0, **kw)]
  again = [b.inputs for b in batching.epoch_batches(examples, epoch=0, **kw)]
  other = [b.inputs for b in batching.epoch_batches(examples, epoch=1, **kw)]
  assert len(first) == 4 and all(a.shape[-1] % 16 == 0 for a in first)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(first, other))
  seen = sorted(tuple(row[row != 0]) for b in first for row in b.reshape(-1, b.shape[-1]))
  assert seen == sorted(tuple(e.inputs[e.inputs != 0]) for e in examples)
  # resuming at step 3 yields the tail of the same sequence
  per_epoch = batching.steps_per_epoch(examples, epochs=2, **kw)
  tail = [b.inputs for _, _, b in batching.iter_batches(examples, per_epoch, 3, **kw)]
  np.testing.assert_array_equal(tail[0], first[3])
  np.testing.assert_array_equal(tail[1], other[0])


def test_grad_accum_layout_splits_rows():
  examples, _ = _tokenize(records(8), max_len=64)
  (batch,) = batching.epoch_batches(examples, batch_size=8, accum=2, max_len=64)
  assert batch.inputs.shape[:2] == (2, 4)
  with pytest.raises(ValueError, match="multiple of grad_accum"):
    batching.epoch_batches(examples, batch_size=6, accum=4, max_len=64)


# ----------------------------------------------------------------------------- bad input

def test_malformed_json_line_names_file_and_line(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", [records(1)[0], "{not json", records(1)[0]])
  with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
    batching.load_records(path)


def test_conversation_without_assistant_turn(tmp_path):
  rows = records(2) + [{"messages": [{"role": "user", "content": "hello?"}]}]
  with pytest.raises(ValueError, match=r"\[2\].*no assistant turn"):
    _tokenize(batching.load_records(write_jsonl(tmp_path / "noasst.jsonl", rows)))


def test_unknown_role(tmp_path):
  rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hey"}]}]
  with pytest.raises(ValueError, match=r"role\.jsonl:1.*unknown role 'bot'"):
    batching.load_records(write_jsonl(tmp_path / "role.jsonl", rows))


def test_empty_file(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("\n")
  with pytest.raises(ValueError, match="empty"):
    batching.load_records(str(path))


def test_dataset_smaller_than_one_batch_says_what_to_do(tmp_path):
  examples, _ = _tokenize(records(3), max_len=64)
  with pytest.raises(ValueError, match="3 usable examples; batch_size is 4"):
    batching.steps_per_epoch(examples, epochs=1, batch_size=4, max_len=64)
  with pytest.raises(ValueError, match="packs into 3 rows of 64 tokens; batch_size is 4"):
    batching.steps_per_epoch(examples, epochs=1, batch_size=4, max_len=64, layout="pack")
