"""emjax must run without torch installed (torch is a test-only dependency)."""

import subprocess
import sys
import textwrap


def test_load_logits_tokenizer_and_generate_without_torch():
  script = textwrap.dedent("""
      import sys
      class BlockTorch:
          def find_spec(self, name, path=None, target=None):
              if name == "torch" or name.startswith("torch."):
                  raise ImportError("torch is blocked in this test")
      sys.meta_path.insert(0, BlockTorch())
      import numpy as np
      import emjax
      import emjax.data
      lm = emjax.load_model("smollm2-135m-instruct")
      text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
      ids = lm.tokenizer.encode(text)
      logits = lm.logits(np.asarray([ids], np.int32))
      assert logits.shape == (1, len(ids), lm.config.vocab_size), logits.shape
      out = emjax.generate(lm, ["Say hello."], max_new_tokens=4, temperature=0)
      assert len(out.token_ids[0]) >= 1
      assert "torch" not in sys.modules
      print("OK")
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")
