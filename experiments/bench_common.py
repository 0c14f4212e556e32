"""What the benchmark binaries share: timing, the machine's ceilings, and the forward and generate
suites (emjax vs transformers on the same weights). No flags here, so any binary can import it."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable


def suite_arg(args: Any, name: str, default: Any) -> Any:
  """A suite's setting, from a dict (a suite run on its own) or from the namespace
  `experiments/benchmark.py` passes every suite; a missing or None value gives `default`."""
  value = args.get(name) if isinstance(args, dict) else getattr(args, name, None)
  return default if value is None else value


def timed(fn: Callable[[], object], repeats: int) -> float:
  """Median wall seconds of fn() after one warm-up call (which absorbs compilation)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_ceiling_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32", torch_device: str = "cpu") -> dict:
  """The machine's matmul rate on random [n, n] operands of `dtype`, with XLA and (if installed) PyTorch."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  secs = timed(lambda: f(a).block_until_ready(), repeats)
  out = {"dtype": dtype, "n": n, "xla_gflops": 2 * n ** 3 / secs / 1e9}
  try:
    import torch
    t = torch.randn(n, n, dtype=getattr(torch, dtype), device=torch_device)
    out["torch_gflops"] = 2 * n ** 3 / timed(lambda: torch_sync(t @ t), repeats) / 1e9
    out["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  out["ceiling_gflops"] = max(v for k, v in out.items() if k.endswith("gflops"))
  return out


def torch_sync(value=None):
  """Waits for queued CUDA work (torch is asynchronous on a GPU); returns `value`."""
  import torch
  if torch.cuda.is_available() and torch.cuda.is_initialized():
    torch.cuda.synchronize()
  return value


def forward_flops(cfg, batch: int, seq: int) -> float:
  """Matmul FLOPs of one forward (projections, attention scores/values, unembedding)."""
  d, f, h, k, dh, L, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.num_layers, cfg.vocab_size)
  per_token = L * (2 * d * h * dh + 2 * 2 * d * k * dh + 2 * h * dh * d + 3 * 2 * d * f) + 2 * d * v
  attention = L * 2 * 2 * h * dh * seq * seq / 2  # causal: half the score matrix
  return batch * (seq * per_token + attention)


def load_hf_reference(source: str):
  """transformers' model for the same weights (GGUF read by transformers), or None + why."""
  try:
    import torch
    import transformers
  except ImportError as e:
    return None, f"transformers/torch not installed ({e})"
  from emjax.io import registry
  path = registry.resolve_builtin(source) if source in registry.BUILTIN_FILES else source
  if path.endswith(".gguf"):
    directory, filename = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval(), None


def suite_forward(lm, hf_model, ceiling: dict, repeats: int, quick: bool, shape: tuple[int, int] | None = None) -> dict:
  import jax
  import numpy as np
  batch, seq = shape or ((2, 32) if quick else (8, 128))
  ids = np.random.default_rng(0).integers(100, lm.config.vocab_size, size=(batch, seq)).astype(np.int32)
  emjax_s = timed(lambda: jax.block_until_ready(lm.logits(ids)), repeats)
  flops = forward_flops(lm.config, batch, seq)
  result = {"shape": f"{batch}x{seq}", "dtype": str(jax.numpy.dtype(lm.compute_dtype)), "emjax_tokens_per_s": batch * seq / emjax_s,
            "emjax_fraction_of_ceiling": flops / emjax_s / 1e9 / ceiling["ceiling_gflops"]}
  if hf_model is not None:
    import torch
    t_ids = torch.tensor(ids, dtype=torch.long, device=hf_model.device)
    with torch.no_grad():
      hf_s = timed(lambda: torch_sync(hf_model(t_ids).logits), repeats)
    result.update({"transformers_tokens_per_s": batch * seq / hf_s,
                   "transformers_fraction_of_ceiling": flops / hf_s / 1e9 / ceiling["ceiling_gflops"],
                   "ratio_emjax_over_transformers": hf_s / emjax_s})
  return result


def suite_generate(lm, hf_model, ceiling: dict, repeats: int, quick: bool) -> dict:
  import emjax
  import numpy as np
  new_tokens = 16 if quick else 128
  topics = ["the ocean", "a small town", "friendship", "winter", "robots", "cooking", "music", "trains"]
  out = {}
  for batch in ((4,) if quick else (32, 8)):
    prompts = [f"Write a short story about {topics[i % len(topics)]} (version {i})." for i in range(batch)]
    run = lambda: emjax.generate(lm, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=0, stop_at_eos=False,
                                 batch_size=batch)
    emjax_s = timed(run, max(1, repeats - 1))
    prompt_len = max(len(p) for p in run().prompt_token_ids)
    mean_ctx = prompt_len + new_tokens / 2
    decode_flops = forward_flops(lm.config, batch, 1) + batch * lm.config.num_layers * 4 * lm.config.num_heads * \
        lm.config.head_dim * mean_ctx
    row = {"batch": batch, "new_tokens": new_tokens, "temperature": 1.0,
           "emjax_new_tokens_per_s": batch * new_tokens / emjax_s,
           "emjax_fraction_of_ceiling": decode_flops * new_tokens / emjax_s / 1e9 / ceiling["ceiling_gflops"]}
    if hf_model is not None:
      import torch
      tok = lm.tokenizer
      rendered = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
      width = max(map(len, rendered))
      ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rendered], device=hf_model.device)
      mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rendered], device=hf_model.device)

      def hf_run():
        torch.manual_seed(0)
        with torch.no_grad():
          return torch_sync(hf_model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                              top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              pad_token_id=tok.pad_id))
      hf_s = timed(hf_run, max(1, repeats - 1))
      row.update({"transformers_new_tokens_per_s": batch * new_tokens / hf_s,
                  "ratio_emjax_over_transformers": hf_s / emjax_s})
    out[f"batch{batch}"] = row
  return out


def machine_info() -> dict:
  import jax
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
