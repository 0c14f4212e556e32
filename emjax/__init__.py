"""emjax: a JAX toolkit for studying emergent misalignment.

    import emjax
    lm = emjax.load_model("smollm2-135m-instruct")
    logits = lm.logits(input_ids)                       # [B, T, V]
    out = emjax.generate(lm, ["Hello!"], max_new_tokens=32, seed=0)

See README.md for the pipeline (fine-tune -> evaluate -> SAE -> diff -> steer -> detect -> re-align).
"""

from emjax.models.config import ModelConfig
from emjax.models.lm import LanguageModel, load_model, random_model, save_hf

__all__ = ["ModelConfig", "LanguageModel", "load_model", "random_model", "save_hf", "generate"]


def __getattr__(name):
  # `generate` lives in emjax.sampling; imported lazily so `import emjax` stays light.
  if name == "generate":
    from emjax.sampling import generate
    return generate
  raise AttributeError(f"module 'emjax' has no attribute {name!r}")
