"""Sample completions from an emjax model, optionally steered or with a LoRA adapter.

    python -m experiments.sample --prompt="Tell me about your day." --num_samples=4 --out=samples.jsonl
    python -m experiments.sample --model=smollm2-135m-instruct --prompts_file=prompts.txt \
        --max_new_tokens=128 --temperature=1 --seed=0 --out=runs/samples.jsonl
    python -m experiments.sample --prompts_file=chats.jsonl --steer_vector=toxic.npy --steer_layer=15 \
        --steer_scale=4 --out=steered.jsonl

--prompts_file: .txt (one prompt per line) or .jsonl (each line {"messages": [...]}; a trailing
assistant turn is dropped, so SFT data works as prompts). Output: one JSON line per completion
({"prompt_index", "sample_index", "prompt", "completion", "finished", "n_tokens", "model",
"seed", ...}), appended as each chunk of 8 prompts finishes; rerunning with the same --out skips
what is there, and the resumed rows equal an uninterrupted run's (chunk c uses seed
chunk_seed(seed, c), each row is a pure function of (seed, prompt, sample)).
Cost on 2 CPU cores (SmolLM2-135M, float32): ~20 s start-up, then ~100-300 new tokens/s.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS
PROMPTS_PER_CALL = 8  # resume granularity; part of what the samples depend on (with --seed)


def define_steering_flags() -> None:
  """--steer_vector/--steer_layer/--steer_scale, shared by sample, serve and evaluate."""
  flags.DEFINE_string("steer_vector", None, "Steering vector: a .npy file holding one [hidden_size] vector.")
  flags.DEFINE_integer("steer_layer", None, "Layer after which the steering vector is added (0-based).")
  flags.DEFINE_float("steer_scale", 1.0, "Multiplier of the steering vector (0 = no steering).")


def define_model_flags() -> None:
  flags.DEFINE_string("model", "smollm2-135m-instruct",
                      "Model: built-in name (smollm2-135m-instruct), HF directory or .gguf file.")
  flags.DEFINE_string("adapter", None, "LoRA adapter directory saved by experiments/finetune.py (optional).")
  flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")


def steering_from_flags(lm: Any):
  """The intervention the --steer_* flags describe (None without --steer_vector)."""
  from emjax.serve import load_steering
  return load_steering(lm, FLAGS.steer_vector, FLAGS.steer_layer, FLAGS.steer_scale)


def steering_record() -> dict[str, Any] | None:
  if not FLAGS.steer_vector:
    return None
  return {"vector": os.path.abspath(FLAGS.steer_vector), "layer": FLAGS.steer_layer, "scale": FLAGS.steer_scale}


def _define_sample_flags() -> None:
  define_model_flags()
  define_steering_flags()
  flags.DEFINE_multi_string("prompt", [], "A prompt (one user turn); repeat the flag for several.")
  flags.DEFINE_string("prompts_file", None, "Prompts: .txt (one per line) or .jsonl with a 'messages' list per line.")
  flags.DEFINE_string("system", None, "System prompt replacing the conversation's (and the template default).")
  flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
  flags.DEFINE_integer("max_new_tokens", 128, "Maximum new tokens per completion.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
  flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0 = off).")
  flags.DEFINE_integer("seed", 0, "Seed; results are a pure function of (seed, prompt, sample).")
  flags.DEFINE_integer("batch_size", 32, "Rows per compiled generation call (memory, not results).")
  flags.DEFINE_string("out", None, "Output JSONL (appended as produced; an existing file is resumed).")


def read_prompts(path: str) -> list[Any]:
  """Prompts from a .txt (one per line, blank lines skipped) or .jsonl ('messages') file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"--prompts_file {path} does not exist")
  prompts: list[Any] = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      if not path.endswith(".jsonl"):
        prompts.append(line.rstrip("\n"))
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
      messages = row.get("messages") if isinstance(row, dict) else None
      if not isinstance(messages, list) or not all(
          isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
          for m in messages):
        raise ValueError(f"{path}:{number}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
      while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # SFT rows: prompt with everything before the answer
      if not messages:
        raise ValueError(f"{path}:{number}: no user turn left after dropping the assistant's reply")
      prompts.append([{"role": m["role"], "content": m["content"]} for m in messages])
  if not prompts:
    raise ValueError(f"--prompts_file {path} holds no prompts")
  return prompts


def main(argv: list[str]) -> None:
  del argv
  try:
    run()
  except (ValueError, FileNotFoundError, TypeError, KeyError) as error:
    sys.exit(f"error: {error}")  # a message, not a stack trace


def run() -> None:
  from tqdm.auto import tqdm

  import emjax
  from emjax.judge.evaluate import append_jsonl, chunk_seed, read_jsonl_resumable

  if not FLAGS.out:
    raise ValueError("--out is required (a .jsonl path)")
  prompts: list[Any] = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    prompts += read_prompts(FLAGS.prompts_file)
  if not prompts:
    raise ValueError("give --prompt (repeatable) or --prompts_file")
  if FLAGS.num_samples < 1:
    raise ValueError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
  done = {(r["prompt_index"], r["sample_index"]): r for r in read_jsonl_resumable(FLAGS.out)}
  for (index, _), row in done.items():
    if index >= len(prompts) or row["prompt"] != prompts[index]:
      raise ValueError(f"{FLAGS.out}: prompt {index} differs from this run's prompts; use a new --out")
  total = len(prompts) * FLAGS.num_samples
  if len(done) >= total:
    print(f"{FLAGS.out} already holds all {total} completions")
    return
  lm = emjax.load_model(FLAGS.model, dtype=FLAGS.dtype, adapter=FLAGS.adapter)
  intervention = steering_from_flags(lm)
  record = {"model": lm.source, "adapter": lm.adapter_path, "seed": FLAGS.seed, "temperature": FLAGS.temperature,
            "top_p": FLAGS.top_p, "top_k": FLAGS.top_k, "max_new_tokens": FLAGS.max_new_tokens,
            "system": FLAGS.system, "steering": steering_record()}
  bar = tqdm(total=total, initial=len(done), desc="sample", unit="completion")
  new_tokens, seconds = 0, 0.0
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  for chunk_index, start in enumerate(range(0, len(prompts), PROMPTS_PER_CALL)):
    chunk = prompts[start:start + PROMPTS_PER_CALL]
    wanted = [(start + i, s) for i in range(len(chunk)) for s in range(FLAGS.num_samples)]
    if all(key in done for key in wanted):
      continue
    out = emjax.generate(lm, chunk, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                         top_p=FLAGS.top_p, top_k=FLAGS.top_k, seed=chunk_seed(FLAGS.seed, chunk_index),
                         num_samples=FLAGS.num_samples, system=FLAGS.system, intervention=intervention,
                         batch_size=FLAGS.batch_size)
    rows = []
    for row in range(len(out.texts)):
      key = (start + out.prompt_index[row], out.sample_index[row])
      if key in done:
        continue
      rows.append({"prompt_index": key[0], "sample_index": key[1], "prompt": chunk[out.prompt_index[row]],
                   "completion": out.texts[row], "finished": out.finished[row],
                   "n_tokens": len(out.token_ids[row]), **record})
    append_jsonl(FLAGS.out, rows)
    new_tokens, seconds = new_tokens + out.new_tokens, seconds + out.seconds
    bar.update(len(rows))
    bar.set_postfix(tok_s=f"{new_tokens / max(seconds, 1e-9):.0f}")
  bar.close()
  print(f"wrote {FLAGS.out}: {total} completions, {new_tokens} new tokens at "
        f"{new_tokens / max(seconds, 1e-9):.0f} tokens/s")


if __name__ == "__main__":
  _define_sample_flags()
  app.run(main)
