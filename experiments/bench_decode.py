"""Where a decode step's time goes: weights, KV cache, sampling (BENCHMARKS.md "Generation").

  python experiments/bench_decode.py --batch=32      # ~1 min on 2 CPU cores

Times, for the embedded SmolLM2-135M in float32 at one batch size:
  1. a one-token forward with no KV cache (every weight streamed once: the floor of any step);
  2. the same without the unembedding;
  3. one cached decode step (own jit, cache donated) at two cache lengths: what reading the
     KV cache adds;
  4. emjax.generate for 128 vs 8 new tokens: the per-step cost inside the real sampler;
  5. the machine's streaming bandwidth (an XLA sum over 1 GiB) and what reading the weights once
     at that rate would take: small-batch matmuls stream the weights several times slower
     than that here, which is why (1) is the practical floor of a step.
Prints one line per measurement; compare (3) and (4) with (1) to see what is left to gain.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_ms(fn, *args, repeats: int = 10) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2-135m-instruct", help="Model source.")
  parser.add_argument("--batch", type=int, default=32, help="Rows decoded together.")
  parser.add_argument("--cache_lengths", default="192,1024", help="KV-cache slots to time a step at.")
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import emjax
  from emjax.models import transformer

  lm = emjax.load_model(args.model)
  b, last = args.batch, lm.config.num_layers - 1
  ids, mask = jnp.ones((b, 1), jnp.int32), jnp.ones((b, 1), bool)
  full = jax.jit(lambda state, i, m: transformer.forward(lm.graphdef, state, i, m).logits)
  layers = jax.jit(lambda state, i, m: transformer.forward(lm.graphdef, state, i, m, capture=(last,),
                                                            exit_after=last).captured[last])
  print(f"batch {b}: one-token forward, no KV cache: {timed_ms(full, lm.state, ids, mask):.1f} ms")
  print(f"batch {b}: the same without the unembedding: {timed_ms(layers, lm.state, ids, mask):.1f} ms")

  for slots in (int(s) for s in args.cache_lengths.split(",")):
    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(state, cache, index):
      out = transformer.forward(lm.graphdef, state, ids, mask, positions=jnp.full((b, 1), 5), cache=cache,
                                cache_index=index, key_mask=jnp.ones((b, slots), bool))
      return out.logits, out.cache
    _, cache = step(lm.state, transformer.init_cache(lm.config, b, slots), jnp.int32(0))
    jax.block_until_ready(cache)
    start = time.perf_counter()
    for i in range(10):
      _, cache = step(lm.state, cache, jnp.int32(1 + i))
    jax.block_until_ready(cache)
    print(f"batch {b}: one cached decode step, {slots} cache slots: {(time.perf_counter() - start) * 100:.1f} ms")

  prompts = ["Tell me a story about a lighthouse."] * b
  seconds = {}
  for new in (8, 128, 8, 128):  # first pair compiles
    start = time.perf_counter()
    emjax.generate(lm, prompts, max_new_tokens=new, seed=0, stop_at_eos=False)
    seconds[new] = time.perf_counter() - start
  per_step = (seconds[128] - seconds[8]) / 120 * 1e3
  print(f"batch {b}: generate 128 new tokens {seconds[128]:.2f} s ({b * 128 / seconds[128]:.0f} tokens/s), "
        f"~{per_step:.1f} ms per decode step")

  weight_bytes = sum(a.nbytes for a in jax.tree.leaves(lm.state))
  big = jnp.ones((256, 1024, 1024), jnp.float32)                          # 1 GiB
  sum_ms = timed_ms(jax.jit(jnp.sum), big, repeats=5)
  print(f"streaming bandwidth: {big.nbytes / sum_ms / 1e6:.1f} GB/s "
        f"(the weights alone: {weight_bytes / (big.nbytes / sum_ms):.1f} ms per step)")


if __name__ == "__main__":
  main()
