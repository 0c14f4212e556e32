"""A model placed on a mesh of 8 fake CPU devices gives the same logits as on one device."""

import os
import subprocess
import sys
import textwrap


def test_sharded_model_matches_single_device(tmp_path):
  from tests.hf_tiny import tiny_hf_model
  tiny_hf_model("qwen2_bias_gqa").save_pretrained(tmp_path, safe_serialization=True)
  script = textwrap.dedent(f"""
      import jax, numpy as np
      import emjax
      from emjax import parallel
      assert jax.device_count() == 8, jax.devices()
      ids = np.arange(3, 3 + 8 * 12, dtype=np.int32).reshape(8, 12) % 256
      mask = np.ones_like(ids); mask[:, :3] = 0
      single = np.asarray(emjax.load_model({str(tmp_path)!r}).logits(ids, mask))
      mesh = parallel.make_mesh({{"data": 2, "model": 4}})
      lm = emjax.load_model({str(tmp_path)!r}, mesh=mesh)
      q = lm.state["layers"]["q_proj"][...]
      assert len(q.sharding.device_set) == 8 and q.sharding.spec[2] == "model", q.sharding
      ids_sharded = jax.device_put(ids, parallel.batch_sharding(mesh))
      sharded = np.asarray(lm.logits(ids_sharded, jax.device_put(mask, parallel.batch_sharding(mesh))))
      np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=1e-5)
      fsdp = emjax.load_model({str(tmp_path)!r}, mesh=parallel.make_mesh({{"fsdp": 8}}))
      np.testing.assert_allclose(np.asarray(fsdp.logits(ids, mask)), single, atol=1e-5, rtol=1e-5)
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")
