"""Shared fixtures. Tests run on CPU, in float32, offline."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm():
  """The embedded default model, loaded once per test session."""
  import emjax
  return emjax.load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_gguf_path():
  from emjax.io import registry
  return registry.resolve_builtin("smollm2-135m-instruct")
