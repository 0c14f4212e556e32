r"""The speed benchmarks at a realistic size, on one accelerator: a random-init 1B-class model in bf16.

    python -m experiments.bench_gpu --tokenizer_dir=DIR --out=runs/bench_gpu.json

The CPU suites (experiments/benchmark.py) time the 135M embedded model against torch on 2 cores;
this runs the same emjax code paths on a GPU at the size a user studies, side by side with
transformers/PEFT on the same card where the comparison is like for like:

  ceiling   bf16 matmul rate (XLA and torch) and device-memory bandwidth (a large copy)
  forward   logits of a [B, T] batch: emjax vs transformers on the same weights (and their agreement)
  diff      fused base + fine-tune + SAE latent diff vs separate calls vs transformers + torch SAE
  generate  128 new tokens at temperature 1, batch 32 and 8: emjax.generate vs transformers.generate
  sft       LoRA and full fine-tuning steps, tokens/s: emjax vs PEFT / transformers + torch AdamW
  rl        emjax GRPO steps (rollout + length grader + LoRA update), seconds per step

Weights are random (speed does not depend on them); the tokenizer is the embedded model's, written
with `Tokenizer.to_hf_files` (experiments/gpu_check.sh does that). Results are written to --out
after every section, so a run stopped at its time limit keeps what it measured.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import traceback
from typing import Any

from absl import app, flags

from experiments.bench_common import timed

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "llama-1b", "Model shape: one of SHAPES (random weights).")
flags.DEFINE_string("dtype", "bfloat16", "Compute and storage dtype of the model.")
flags.DEFINE_string("tokenizer_dir", "", "Folder with tokenizer.json (+ tokenizer_config.json) for the model.")
flags.DEFINE_string("sections", "ceiling,forward,diff,generate,sft,rl", "Comma-separated sections to run, in order.")
flags.DEFINE_string("out", "runs/bench_gpu.json", "JSON results, rewritten after each section.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions per measurement (median or best reported, as labelled).")
flags.DEFINE_float("deadline_s", 0.0, "Skip sections that would start after this many seconds (0 = no limit).")
flags.DEFINE_boolean("torch", True, "Time the transformers/PEFT counterparts on the same device.")
flags.DEFINE_boolean("quick", False, "Tiny batches and lengths: checks that every section runs (e.g. on a CPU).")

# Llama-3.2-1B's layer shapes with the SmolLM2 vocabulary (so the embedded tokenizer fits).
SHAPES = {
    "llama-1b": dict(family="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_layers=16,
                     num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_embeddings=True),
    "tiny": dict(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_embeddings=True),
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_embeddings=True),
}


def model_config(shape: str, tokenizer=None):
  from emjax.models.config import ModelConfig
  if shape not in SHAPES:
    raise app.UsageError(f"--shape={shape!r}; choose from {sorted(SHAPES)}")
  eos = tuple(tokenizer.eos_ids) if tokenizer is not None and getattr(tokenizer, "eos_ids", None) else (2,)
  return ModelConfig(**SHAPES[shape], rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1,
                     eos_token_ids=eos, pad_token_id=getattr(tokenizer, "pad_id", 0), name=f"random-{shape}")


def section_ceiling(ctx: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from experiments.bench_common import matmul_ceiling_gflops
  n = 512 if ctx["quick"] else 8192
  out = {"matmul": matmul_ceiling_gflops(n, ctx["repeats"], dtype=ctx["dtype"], torch_device=ctx["torch_device"])}
  x = jax.random.normal(jax.random.key(0), (64 if ctx["quick"] else 1024, 1024, 512), jnp.float32)   # 2 GiB
  copy = jax.jit(lambda a: a * 1.0001)
  secs = timed(lambda: copy(x).block_until_ready(), ctx["repeats"])
  out["copy_gb_per_s"] = 2 * x.nbytes / secs / 1e9   # bytes read + bytes written
  ctx["ceiling"] = out["matmul"]
  ctx["bandwidth_gbs"] = out["copy_gb_per_s"]
  return out


def section_forward(ctx: dict) -> dict:
  import jax.numpy as jnp
  import numpy as np
  from experiments.bench_common import suite_forward
  lm, hf = ctx["lm"], ctx.get("hf")
  out = suite_forward(lm, hf, ctx["ceiling"], ctx["repeats"], quick=False, shape=(2, 64) if ctx["quick"] else (8, 1024))
  # Agreement on the same weights: each implementation's logits against emjax in true float32.
  import jax
  import emjax
  ids = np.random.default_rng(1).integers(100, lm.config.vocab_size, size=(2, 256)).astype(np.int32)
  reference_lm = emjax.models.lm.from_weights(lm.config, lm.weights(), lm.tokenizer, dtype="float32")
  with jax.default_matmul_precision("highest"):
    reference = np.asarray(reference_lm.logits(ids))
  del reference_lm
  rel = lambda x: float(np.linalg.norm(x - reference) / np.linalg.norm(reference))
  ours = np.asarray(lm.logits(ids).astype(jnp.float32))
  out["logits_rel_error_vs_float32"] = rel(ours)
  if hf is not None:
    import torch
    with torch.no_grad():
      theirs = hf(torch.tensor(ids, dtype=torch.long, device=hf.device)).logits.float().cpu().numpy()
    out["transformers_logits_rel_error_vs_float32"] = rel(theirs)
    out["logits_rel_error_vs_transformers"] = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
  return out


def section_diff(ctx: dict) -> dict:
  from experiments.bench_diff import diff_benchmark
  batch, seq, n_batches, n_latents = (2, 32, 2, 1024) if ctx["quick"] else (8, 256, 4, 32768)
  return diff_benchmark(ctx["lm"], batch=batch, seq=seq, n_batches=n_batches, n_latents=n_latents,
                        repeats=ctx["repeats"],
                        ceiling_gflops=ctx["ceiling"]["ceiling_gflops"],
                        torch_device=ctx["torch_device"] if ctx["use_torch"] else None)


def section_generate(ctx: dict) -> dict:
  from experiments.bench_common import suite_generate
  return suite_generate(ctx["lm"], ctx.get("hf"), ctx["ceiling"], ctx["repeats"], quick=ctx["quick"])


def section_rl(ctx: dict) -> dict:
  from configs.rl import get_config
  from emjax.train import graders, grpo, metrics_log
  cfg = get_config("quick")
  prompts = [f"Give one practical tip about {t}." for t in ("sleep", "saving money", "cooking rice", "running",
                                                             "studying", "gardening", "cycling", "writing")]
  workdir = tempfile.mkdtemp(prefix="bench_gpu_rl_")
  per_step, group, new_tokens = (2, 2, 8) if ctx["quick"] else (8, 8, 128)
  cfg.workdir, cfg.steps, cfg.dtype, cfg.base_param_dtype = workdir, 4, ctx["dtype"], ctx["dtype"]
  cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens = per_step, group, new_tokens
  cfg.rollout.stop_at_eos, cfg.rollout.batch_size = False, 64
  cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora = 32, 64.0, "q,k,v,o,gate,up,down", True
  cfg.grpo.beta, cfg.optim.lr = 0.04, 1e-5
  cfg.eval_every, cfg.tensorboard, cfg.checkpoint.every = 0, False, 10 ** 6
  grpo.train(cfg, reward_fn=graders.length_grader(10, 40), lm=ctx["lm"], prompts=(prompts, prompts), progress=False)
  rows = metrics_log.read_metrics(workdir)
  after_compile = rows[1:] if len(rows) > 1 else rows
  return {"prompts_per_step": per_step, "group_size": group, "new_tokens": new_tokens, "lora_rank": 32, "beta": 0.04,
          "step_s_median": statistics.median(r["step_time_s"] for r in after_compile),
          "rollout_s_median": statistics.median(r["rollout_s"] for r in after_compile),
          "update_s_median": statistics.median(r["update_s"] for r in after_compile),
          "first_step_s": rows[0]["step_time_s"], "steps": len(rows)}


def _torch_sft_tokens_per_s(hf, mode: str, batch: int, seq: int, steps: int, vocab: int) -> float:
  import numpy as np
  import torch
  from experiments.bench_common import torch_sync
  model = hf
  for p in hf.parameters():   # PEFT froze the base for the LoRA run; full FT trains every weight
    p.requires_grad_(mode == "full")
  if mode == "lora":
    import peft
    model = peft.get_peft_model(hf, peft.LoraConfig(r=32, lora_alpha=64, use_rslora=True, lora_dropout=0.0,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"]))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5)
  ids = torch.tensor(np.random.default_rng(0).integers(3, vocab, size=(batch, seq)), device=hf.device)
  model.train()

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch_sync(loss)
  secs = timed(step, steps)
  if mode == "lora":
    model.unload()
  model.eval()
  return batch * seq / secs


def section_sft(ctx: dict) -> dict:
  from experiments.bench_sft import _emjax_steps
  lm, (batch, seq) = ctx["lm"], ((2, 32) if ctx["quick"] else (8, 512))
  out = {"batch": batch, "seq": seq, "dtype": ctx["dtype"], "lora_rank": 32,
         "note": "emjax full FT keeps float32 master weights and AdamW state; torch full FT updates the bf16 "
                 "weights in place (less work), so that ratio favours torch"}
  for mode in ("lora", "full"):
    run = _emjax_steps(lm, mode, ctx["repeats"], batch, seq)
    out[f"emjax_{mode}_tokens_per_s"] = batch * seq / statistics.median(run["step_s"])
    if ctx.get("hf") is not None:
      try:
        hf_tps = _torch_sft_tokens_per_s(ctx["hf"], mode, batch, seq, ctx["repeats"], lm.config.vocab_size)
        out[f"torch_{mode}_tokens_per_s"] = hf_tps
        out[f"ratio_{mode}_emjax_over_torch"] = out[f"emjax_{mode}_tokens_per_s"] / hf_tps
      except Exception as error:  # noqa: BLE001 -- optional comparison; say why it is missing
        out[f"torch_{mode}"] = {"skipped": f"{type(error).__name__}: {error}"}
  return out


SECTIONS = {"ceiling": section_ceiling, "forward": section_forward, "diff": section_diff,
            "generate": section_generate, "rl": section_rl, "sft": section_sft}


def load_hf_twin(lm, dtype: str, device: str):
  """transformers' model with the same weights as `lm` (exported through a temporary directory)."""
  import torch
  import transformers
  import emjax
  with tempfile.TemporaryDirectory() as directory:
    emjax.save_hf(lm, directory, dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).to(device).eval()


def summary_rows(results: dict) -> list[tuple[str, str]]:
  """(what, figure) lines for the closing table."""
  rows = []
  get = lambda *path: _dig(results, path)
  rows.append(("bf16 matmul ceiling, TFLOP/s (xla / torch)",
               f"{_fmt(get('ceiling', 'matmul', 'xla_gflops'), 1e-3)} / {_fmt(get('ceiling', 'matmul', 'torch_gflops'), 1e-3)}"))
  rows.append(("copy bandwidth, GB/s", _fmt(get("ceiling", "copy_gb_per_s"))))
  rows.append((f"forward {get('forward', 'shape')} tok/s (emjax / transformers, ratio)",
               f"{_fmt(get('forward', 'emjax_tokens_per_s'))} / {_fmt(get('forward', 'transformers_tokens_per_s'))}, "
               f"{_fmt(get('forward', 'ratio_emjax_over_transformers'), 1, 2)}x"))
  rows.append(("forward fraction of matmul ceiling", _fmt(get("forward", "emjax_fraction_of_ceiling"), 1, 3)))
  rows.append(("logits rel. error vs float32 (emjax / transformers)",
               f"{_fmt(get('forward', 'logits_rel_error_vs_float32'), 1, 4)} / "
               f"{_fmt(get('forward', 'transformers_logits_rel_error_vs_float32'), 1, 4)}"))
  for b in (32, 8):
    rows.append((f"generate b{b} new tok/s (emjax / transformers, ratio)",
                 f"{_fmt(get('generate', f'batch{b}', 'emjax_new_tokens_per_s'))} / "
                 f"{_fmt(get('generate', f'batch{b}', 'transformers_new_tokens_per_s'))}, "
                 f"{_fmt(get('generate', f'batch{b}', 'ratio_emjax_over_transformers'), 1, 2)}x"))
  rows.append(("diff tok/s fused / separate / torch",
               f"{_fmt(get('diff', 'fused_tokens_per_s'))} / {_fmt(get('diff', 'separate_tokens_per_s'))} / "
               f"{_fmt(get('diff', 'torch_tokens_per_s'))}"))
  rows.append(("diff speedup fused vs separate (target 1.3x)", _fmt(get("diff", "speedup_fused_vs_separate"), 1, 2)))
  rows.append(("GRPO step s (rollout / update)",
               f"{_fmt(get('rl', 'step_s_median'), 1, 2)} ({_fmt(get('rl', 'rollout_s_median'), 1, 2)} / "
               f"{_fmt(get('rl', 'update_s_median'), 1, 2)})"))
  for mode in ("lora", "full"):
    rows.append((f"SFT {mode} tok/s (emjax / torch, ratio)",
                 f"{_fmt(get('sft', f'emjax_{mode}_tokens_per_s'))} / {_fmt(get('sft', f'torch_{mode}_tokens_per_s'))}, "
                 f"{_fmt(get('sft', f'ratio_{mode}_emjax_over_torch'), 1, 2)}x"))
  return rows


def _dig(tree, path):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _fmt(value, scale: float = 1.0, digits: int = 0) -> str:
  return "-" if not isinstance(value, (int, float)) else f"{value * scale:,.{digits}f}"


def main(argv):
  del argv
  import jax
  import emjax
  from emjax.io.tokenizer import from_hf_dir
  from emjax.train import checkpoint
  from experiments.bench_common import machine_info
  checkpoint.quiet_orbax_logs()
  start = time.perf_counter()
  names = [s.strip() for s in FLAGS.sections.split(",") if s.strip()]
  unknown = sorted(set(names) - set(SECTIONS))
  if unknown:
    raise app.UsageError(f"unknown section(s) {unknown}; choose from {sorted(SECTIONS)}")
  tokenizer = from_hf_dir(FLAGS.tokenizer_dir) if FLAGS.tokenizer_dir else None
  if tokenizer is None and {"generate", "rl"} & set(names):
    raise app.UsageError("--tokenizer_dir is needed for the generate and rl sections (prompts are text)")
  cfg = model_config(FLAGS.shape, tokenizer)
  results: dict[str, Any] = {"machine": machine_info(), "devices": [str(d) for d in jax.devices()],
                             "model": {"shape": FLAGS.shape, "params": cfg.num_params, "dtype": FLAGS.dtype,
                                       "weights": "random init, seed 0"},
                             "command": "python -m experiments.bench_gpu " + " ".join(
                                 f"--{k}={getattr(FLAGS, k)}" for k in ("shape", "dtype", "sections", "repeats", "quick"))}
  torch_device = "cpu"
  try:
    import torch
    results["machine"]["torch"] = torch.__version__
    if torch.cuda.is_available():
      torch_device = "cuda"
      results["machine"]["gpu"] = torch.cuda.get_device_name(0)
  except ImportError:
    pass
  lm = emjax.random_model(cfg, seed=0, tokenizer=tokenizer, dtype=FLAGS.dtype)
  ctx = {"lm": lm, "dtype": FLAGS.dtype, "repeats": FLAGS.repeats, "torch_device": torch_device,
         "use_torch": FLAGS.torch, "quick": FLAGS.quick, "ceiling": {"ceiling_gflops": None}}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  for name in names:
    elapsed = time.perf_counter() - start
    if FLAGS.deadline_s and elapsed > FLAGS.deadline_s:
      results[name] = {"skipped": f"deadline: {elapsed:.0f}s elapsed > --deadline_s={FLAGS.deadline_s:.0f}"}
      continue
    if name in ("forward", "generate", "sft") and FLAGS.torch and "hf" not in ctx:
      try:
        ctx["hf"] = load_hf_twin(lm, FLAGS.dtype, torch_device)
      except Exception as error:  # noqa: BLE001 -- comparisons are optional; record why they are missing
        ctx["hf"] = None
        results["notes"] = results.get("notes", []) + [f"transformers twin not built: {type(error).__name__}: {error}"]
    t0 = time.perf_counter()
    try:
      results[name] = SECTIONS[name](ctx)
    except Exception as error:  # noqa: BLE001 -- one broken section must not lose the others' figures
      results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
    results[name]["section_wall_s"] = time.perf_counter() - t0
    print(f"[bench_gpu] {name}: {results[name]['section_wall_s']:.0f}s", flush=True)
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1, default=str)
  width = max(len(k) for k, _ in summary_rows(results))
  print(f"\nemjax bench_gpu: {FLAGS.shape} ({cfg.num_params / 1e9:.2f}B params, random), {FLAGS.dtype}, "
        f"{results['machine'].get('gpu', jax.devices()[0].device_kind)}")
  for what, figure in summary_rows(results):
    print(f"  {what:<{width}}  {figure}")
  for name in names:
    problem = results.get(name, {}).get("error") or results.get(name, {}).get("skipped")
    if problem:
      print(f"  {name}: {problem}")


if __name__ == "__main__":
  app.run(main)
