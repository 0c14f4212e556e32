"""Tokenizer, chat template and assistant-token masks.

Built with the `tokenizers` library from either a HF directory (`tokenizer.json`,
`tokenizer_config.json`) or a GGUF file's metadata. transformers is not used here: its GGUF
tokenizer path imports torch, and emjax never needs torch at run time.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

Message = dict[str, str]

# llama.cpp's `tokenizer.ggml.pre` names -> the split rule its vocabulary was trained with.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_for(pre: str | None):
  from tokenizers import Regex, pre_tokenizers
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    # SmolLM's vocabulary was trained with every digit split off before byte-level BPE.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  split = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}.get(pre or "")
  if split is None:
    return byte_level  # GPT-2's own split rule
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _raise_template_exception(message):
  raise ValueError(f"chat template error: {message}")


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
  """The chat template compiled once (compiling took ~6 ms, more than rendering, per message list)."""
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
  env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
  env.globals["raise_exception"] = _raise_template_exception
  return env.from_string(template)


def _render_template(template: str, messages: Sequence[Message], add_generation_prompt: bool,
                     special: dict[str, str]) -> str:
  return _compiled_template(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                             **special)


@dataclass
class Tokenizer:
  """A `tokenizers.Tokenizer` plus what chat models need: special ids and a chat template."""
  backend: Any                          # tokenizers.Tokenizer
  chat_template: str | None
  bos_id: int | None
  eos_ids: tuple[int, ...]
  pad_id: int
  add_bos: bool = False
  special_ids: frozenset[int] = field(default_factory=frozenset)
  special_tokens: dict[str, str] = field(default_factory=dict)  # e.g. {"bos_token": "<s>"} for templates

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
    if self.add_bos and self.bos_id is not None:
      out = [[self.bos_id] + ids for ids in out]
    return out

  def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template; pass plain text prompts or a model with one")
    return _render_template(self.chat_template, messages, add_generation_prompt, self.special_tokens)

  def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
    return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt), add_bos=False)

  def encode_chat_with_mask(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] and a 0/1 mask [T] of the assistant tokens (content + end-of-turn token).

    Each assistant turn's span is where the rendering of the conversation up to and including
    that turn extends the rendering up to it with the generation prompt; the tokens whose
    characters start inside a span are the ones training puts loss on.
    """
    text = self.apply_chat_template(messages)
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      start_text = self.apply_chat_template(messages[:i], add_generation_prompt=True)
      end_text = self.apply_chat_template(messages[:i + 1])
      if not (text.startswith(end_text) and end_text.startswith(start_text)):
        raise ValueError("the chat template does not render conversations prefix-consistently, "
                         "so assistant tokens cannot be located; use loss on all tokens")
      spans.append((len(start_text), len(end_text)))
    enc = self.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    mask = np.zeros(len(ids), np.int32)
    for t, (char_start, char_end) in enumerate(enc.offsets):
      if char_end > char_start and any(a <= char_start < b for a, b in spans):
        mask[t] = 1
    if self.add_bos and self.bos_id is not None and (len(ids) == 0 or ids[0] != self.bos_id):
      ids = np.concatenate([[self.bos_id], ids]).astype(np.int32)
      mask = np.concatenate([[0], mask]).astype(np.int32)
    return ids, mask

  def to_hf_files(self, directory: str) -> None:
    """Writes tokenizer.json + tokenizer_config.json so transformers can reload the tokenizer."""
    os.makedirs(directory, exist_ok=True)
    self.backend.save(os.path.join(directory, "tokenizer.json"))
    vocab = {i: t for t, i in self.backend.get_vocab(with_added_tokens=True).items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": self.chat_template,
        "bos_token": vocab.get(self.bos_id) if self.bos_id is not None else None,
        "eos_token": vocab.get(self.eos_ids[0]) if self.eos_ids else None,
        "pad_token": vocab.get(self.pad_id),
        "add_bos_token": self.add_bos,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=1)


def from_gguf_metadata(meta: dict[str, Any], where: str = "gguf") -> Tokenizer:
  """Byte-level BPE tokenizer from llama.cpp metadata (`tokenizer.ggml.*`)."""
  from tokenizers import AddedToken, decoders, models
  from tokenizers import Tokenizer as Backend
  if meta.get("model") != "gpt2":
    raise ValueError(f"{where}: tokenizer.ggml.model={meta.get('model')!r}; emjax builds byte-level BPE "
                     "('gpt2') tokenizers from GGUF; use the model's HF directory for other tokenizers")
  tokens = meta["tokens"]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
  backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  backend.pre_tokenizer = _pre_tokenizer_for(meta.get("pre"))
  backend.decoder = decoders.ByteLevel()
  token_types = meta.get("token_type") or []
  control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(token_types) if t == 3]
  user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(token_types) if t == 4]
  backend.add_special_tokens(control)
  if user:
    backend.add_tokens(user)
  eos = meta.get("eos_token_id")
  bos = meta.get("bos_token_id")
  pad = meta.get("padding_token_id")
  special_ids = frozenset(i for i, t in enumerate(token_types) if t == 3)
  return Tokenizer(
      backend=backend,
      chat_template=meta.get("chat_template"),
      bos_id=None if bos is None else int(bos),
      eos_ids=() if eos is None else (int(eos),),
      pad_id=int(pad if pad is not None else (eos if eos is not None else 0)),
      add_bos=bool(meta.get("add_bos_token") or False),
      special_ids=special_ids,
      special_tokens={"bos_token": tokens[bos] if bos is not None else "",
                      "eos_token": tokens[eos] if eos is not None else ""},
  )


def _token_str(value) -> str | None:
  if value is None:
    return None
  return value.get("content") if isinstance(value, dict) else str(value)


def from_hf_dir(directory: str, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
  """Tokenizer from `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`)."""
  from tokenizers import Tokenizer as Backend
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no tokenizer.json (emjax reads fast-tokenizer files; "
                            "save the tokenizer with transformers' save_pretrained first)")
  backend = Backend.from_file(path)
  config: dict[str, Any] = {}
  config_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)
  template = config.get("chat_template")
  if isinstance(template, list):  # several named templates: take the default
    template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if template is None and os.path.isfile(jinja_path):
    with open(jinja_path) as f:
      template = f.read()
  vocab = backend.get_vocab(with_added_tokens=True)
  bos_tok, eos_tok, pad_tok = (_token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
  bos = vocab.get(bos_tok) if bos_tok else None
  eos_ids = tuple(eos_token_ids) or ((vocab[eos_tok],) if eos_tok in vocab else ())
  if eos_tok in vocab and vocab[eos_tok] not in eos_ids:
    eos_ids = eos_ids + (vocab[eos_tok],)
  pad = vocab.get(pad_tok) if pad_tok else None
  special_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
  return Tokenizer(
      backend=backend,
      chat_template=template,
      bos_id=bos,
      eos_ids=eos_ids,
      pad_id=int(pad if pad is not None else (eos_ids[0] if eos_ids else 0)),
      add_bos=bool(config.get("add_bos_token", False)),
      special_ids=special_ids,
      special_tokens={"bos_token": bos_tok or "", "eos_token": eos_tok or ""},
  )

