"""Bad model inputs raise errors that name the file or tensor and say what was expected."""

import json
import os
import shutil

import numpy as np
import pytest

import emjax
from tests.hf_tiny import tiny_hf_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("good")
  tiny_hf_model("llama_mha_untied").save_pretrained(path, safe_serialization=True)
  return path


def copy(saved, tmp_path):
  target = tmp_path / "m"
  shutil.copytree(saved, target)
  return target


def rewrite_tensors(path, edit):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_directory_without_weights(saved, tmp_path):
  target = copy(saved, tmp_path)
  os.remove(target / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    emjax.load_model(str(target))


def test_unknown_model_type(saved, tmp_path):
  target = copy(saved, tmp_path)
  config = json.loads((target / "config.json").read_text())
  config["model_type"] = "gpt_neox"
  (target / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config.json: model_type='gpt_neox' is not supported"):
    emjax.load_model(str(target))


def test_missing_tensor_is_named(saved, tmp_path):
  target = copy(saved, tmp_path)
  rewrite_tensors(target, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight' is missing"):
    emjax.load_model(str(target))


def test_wrong_shape_is_named_with_expected_shape(saved, tmp_path):
  target = copy(saved, tmp_path)
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
  rewrite_tensors(target, shrink)
  with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(8, 64\); expected \(64, 64\)"):
    emjax.load_model(str(target))


def test_truncated_safetensors(saved, tmp_path):
  target = copy(saved, tmp_path)
  data = (target / "model.safetensors").read_bytes()
  (target / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors file"):
    emjax.load_model(str(target))


def test_truncated_gguf(smollm_gguf_path, tmp_path):
  target = tmp_path / "cut.gguf"
  with open(smollm_gguf_path, "rb") as f:
    target.write_bytes(f.read(3_000_000))
  with pytest.raises(ValueError, match=r"cut.gguf: not a readable GGUF file"):
    emjax.load_model(str(target))


def test_pickle_checkpoint_is_refused_and_never_unpickled(saved, tmp_path):
  target = copy(saved, tmp_path)
  os.remove(target / "model.safetensors")
  marker = tmp_path / "executed"

  class Exploit:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  import pickle
  (target / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": Exploit()}))
  with pytest.raises(ValueError, match="never unpickles"):
    emjax.load_model(str(target))
  assert not marker.exists()


def test_unknown_source(tmp_path):
  with pytest.raises(FileNotFoundError, match="built-in name"):
    emjax.load_model(str(tmp_path / "nope"))


def test_unexpected_tensor_is_named(saved, tmp_path):
  target = copy(saved, tmp_path)
  rewrite_tensors(target, lambda t: t.__setitem__("model.layers.0.mystery.weight", np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.mystery.weight'"):
    emjax.load_model(str(target))
