"""experiments/sample.py: prompt files, JSONL output, resumption, steering flags, bad input.

One subprocess writes the full output; a second resumes from a file cut mid-way (with a half
line) and must write exactly the rows the uninterrupted run wrote; the completions are also
checked against `emjax.generate` in this process with the documented chunk seed. The binary
runs a tiny random chat model saved as a HF directory (SmolLM2's tokenizer and template, two
small layers), so each subprocess starts in seconds; the model code is the same.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import emjax
from emjax.judge.evaluate import chunk_seed
from emjax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_PROMPTS = ["Name a fruit.", "Say hello."]
CHAT_PROMPT = [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "Favourite color?"}, {"role": "assistant", "content": "Blue."}]


def run_sample(args, timeout=600):
  return subprocess.run([sys.executable, "-m", "experiments.sample", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_dir(smollm, tmp_path_factory):
  """A HF directory holding a tiny random chat model with SmolLM2's tokenizer."""
  tok = smollm.tokenizer
  cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, eos_token_ids=tok.eos_ids, tie_embeddings=True,
                    name="tiny-chat")
  directory = str(tmp_path_factory.mktemp("tiny_chat"))
  emjax.save_hf(emjax.random_model(cfg, seed=0, tokenizer=tok), directory)
  return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  return emjax.load_model(tiny_dir)


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
  directory = tmp_path_factory.mktemp("prompts")
  text = directory / "prompts.txt"
  text.write_text("\n".join(TEXT_PROMPTS) + "\n\n")
  chats = directory / "chats.jsonl"
  chats.write_text(json.dumps({"messages": CHAT_PROMPT}) + "\n")
  return text, chats


def test_sample_writes_resumes_and_matches_generate(prompt_files, tiny_dir, tiny, tmp_path):
  text, chats = prompt_files
  out = tmp_path / "out.jsonl"
  common = [f"--model={tiny_dir}", "--prompt=Tell me a joke.", f"--prompts_file={text}", "--num_samples=2", "--max_new_tokens=5",
            "--temperature=1", "--seed=7"]
  result = run_sample(common + [f"--out={out}"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert "tokens/s" in result.stdout
  rows = read_rows(out)
  assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(p, s) for p in range(3) for s in range(2)]
  assert [r["prompt"] for r in rows[::2]] == ["Tell me a joke."] + TEXT_PROMPTS
  assert all(r["model"] == tiny_dir and r["seed"] == 7 and r["n_tokens"] <= 5 for r in rows)
  # the documented keying: chunk 0 generated with chunk_seed(seed, 0)
  want = emjax.generate(tiny, ["Tell me a joke."] + TEXT_PROMPTS, max_new_tokens=5, temperature=1.0,
                        seed=chunk_seed(7, 0), num_samples=2)
  assert [r["completion"] for r in rows] == want.texts
  assert len({r["completion"] for r in rows}) > 1  # sampling, not one answer copied

  # a run killed mid-write: keep 2 rows and half a line, rerun, get the uninterrupted file back
  resumed = tmp_path / "resumed.jsonl"
  lines = out.read_text().splitlines(keepends=True)
  resumed.write_text("".join(lines[:2]) + lines[2][:17])
  result = run_sample(common + [f"--out={resumed}"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert read_rows(resumed) == rows

  # a complete file: nothing to do, the model is not even loaded
  result = run_sample(common + [f"--out={resumed}"])
  assert result.returncode == 0 and "already holds all 6" in result.stdout


@pytest.mark.slow
def test_jsonl_prompts_drop_the_answer_and_steering_changes_outputs(prompt_files, tiny_dir, tiny, tmp_path):
  _, chats = prompt_files
  vector = tmp_path / "v.npy"
  np.save(vector, 6.0 * np.random.default_rng(0).normal(size=tiny.config.hidden_size).astype(np.float32))
  plain, steered = tmp_path / "plain.jsonl", tmp_path / "steered.jsonl"
  common = [f"--model={tiny_dir}", f"--prompts_file={chats}", "--max_new_tokens=6", "--temperature=0"]
  assert run_sample(common + [f"--out={plain}"]).returncode == 0
  result = run_sample(common + [f"--out={steered}", f"--steer_vector={vector}", "--steer_layer=1",
                                "--steer_scale=3"])
  assert result.returncode == 0, result.stderr[-2000:]
  plain_row, steered_row = read_rows(plain)[0], read_rows(steered)[0]
  assert plain_row["prompt"] == CHAT_PROMPT[:2]  # the assistant turn was dropped
  greedy = emjax.generate(tiny, [CHAT_PROMPT[:2]], max_new_tokens=6, temperature=0)
  assert plain_row["completion"] == greedy.texts[0]
  assert steered_row["completion"] != plain_row["completion"]
  assert steered_row["steering"] == {"vector": str(vector), "layer": 1, "scale": 3.0}


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user"}]}\n', "chats.jsonl:1: expected"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n', "chats.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', "chats.jsonl:1: no user turn left"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, content, message):
  bad = tmp_path / "chats.jsonl"
  bad.write_text(content)
  result = run_sample([f"--prompts_file={bad}", f"--out={tmp_path / 'o.jsonl'}"])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert message in result.stderr


def test_missing_out_and_prompts_are_clear_errors(tmp_path):
  result = run_sample(["--prompt=hi"])
  assert result.returncode != 0 and "error: --out is required" in result.stderr
  result = run_sample([f"--out={tmp_path / 'o.jsonl'}"])
  assert "error: give --prompt" in result.stderr and "Traceback" not in result.stderr


def test_every_flag_has_help():
  result = run_sample(["--helpfull"])
  flag_lines = [line for line in result.stdout.splitlines() if line.strip().startswith("--")]
  ours = [line for line in flag_lines if any(name in line for name in (
      "--model", "--adapter", "--prompt", "--prompts_file", "--system", "--num_samples", "--max_new_tokens",
      "--temperature", "--top_p", "--top_k", "--seed", "--steer_vector", "--steer_layer", "--steer_scale", "--out"))]
  assert len(ours) >= 15
  for line in ours:
    assert ":" in line and len(line.split(":", 1)[1].strip()) > 5, line
