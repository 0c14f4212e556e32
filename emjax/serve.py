"""An OpenAI-compatible chat server over an emjax model (`experiments/serve.py` is its CLI).

    server = make_server(lm, port=0)                 # 127.0.0.1, a free port
    thread = start_in_thread(server)                 # or server.serve_forever()
    POST http://127.0.0.1:<port>/v1/chat/completions {"model": ..., "messages": [...]}

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (messages, max_tokens, temperature,
top_p, n, seed, logprobs, top_logprobs <= 20; generation stops at the model's end-of-turn token).
Every bad request gets a 4xx JSON body `{"error": {"message", "type"}}`; the server never dies
on one. Model calls are serialised with a lock: one compiled program runs at a time, which is
what a CPU or one accelerator can do anyway.

Log-probabilities are those of the model's own distribution (temperature 1, no top-p), as the
OpenAI API reports them. They come from one teacher-forced forward over prompt + completion
after sampling (`completion_logprobs`), with the same intervention and adapter as the sampler,
so `sampling.py` stays a pure sampler.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
import uuid
from typing import Any, Sequence

import jax
import numpy as np

from emjax import sampling
from emjax.models import intervene
from emjax.models.lm import LanguageModel

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit; the HTTP judge asks for exactly this many
MAX_BODY_BYTES = 1 << 20


class RequestError(Exception):
  """A request the server refuses; becomes a `{"error": ...}` JSON body with this status."""

  def __init__(self, status: int, message: str, error_type: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.error_type = status, message, error_type


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  messages: list[dict[str, str]]
  max_tokens: int
  temperature: float
  top_p: float
  n: int
  seed: int
  logprobs: bool
  top_logprobs: int


# ----------------------------------------------------------------------------- steering from files

def load_steering(lm: LanguageModel, vector_path: str | None, layer: int | None, scale: float,
                  where: str = "all") -> intervene.Intervention | None:
  """The `--steer_vector/--steer_layer/--steer_scale` intervention, or None without a vector.

  vector_path: a .npy file holding one [D] vector (D = the model's hidden size).
  """
  if not vector_path:
    return None
  if layer is None:
    raise ValueError(f"--steer_vector {vector_path} needs --steer_layer (0..{lm.config.num_layers - 1})")
  if not vector_path.endswith(".npy"):
    raise ValueError(f"--steer_vector {vector_path}: expected a .npy file holding one vector")
  try:
    vector = np.load(vector_path, allow_pickle=False)
  except (OSError, ValueError) as error:
    raise ValueError(f"--steer_vector {vector_path}: cannot read ({error})") from None
  vector = np.squeeze(vector)
  if vector.shape != (lm.config.hidden_size,):
    raise ValueError(f"--steer_vector {vector_path}: shape {vector.shape}; expected "
                     f"({lm.config.hidden_size},), the model's hidden size")
  return intervene.steer(lm.config, layer, vector, scale, where)


# ----------------------------------------------------------------------------- request parsing

def _number(body: dict, field: str, default: Any, kind: type, low: float, high: float) -> Any:
  value = body.get(field, default)
  if value is None:
    value = default
  # bool is an int subclass in Python: "max_tokens": true must not pass as 1
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
    raise RequestError(400, f"'{field}' must be {'an integer' if kind is int else 'a number'}, "
                            f"got {json.dumps(value)[:40]}")
  if not low <= value <= high:
    raise RequestError(400, f"'{field}' = {value} is out of range [{low}, {high}]")
  return kind(value)


def parse_chat_request(body: Any, *, model_ids: Sequence[str], max_new_tokens_limit: int,
                       default_max_tokens: int = 256) -> ChatRequest:
  """Validates a decoded `/v1/chat/completions` body; raises RequestError (4xx) on any problem."""
  if not isinstance(body, dict):
    raise RequestError(400, f"request body must be a JSON object, got {type(body).__name__}")
  model = body.get("model")
  if not isinstance(model, str):
    raise RequestError(400, f"'model' must be a string naming one of {list(model_ids)}")
  if model not in model_ids:
    raise RequestError(404, f"model {model!r} is not served here; available: {list(model_ids)}",
                       "model_not_found")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects")
  for index, message in enumerate(messages):
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") \
        or not isinstance(message.get("content"), str):
      raise RequestError(400, f"messages[{index}] must be {{'role': system|user|assistant, "
                              f"'content': <string>}}, got {json.dumps(message)[:80]}")
  if messages[-1]["role"] == "assistant":
    raise RequestError(400, "the last message is the assistant's; continuing an assistant turn is not supported")
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", min(default_max_tokens, max_new_tokens_limit), int,
                       1, max_new_tokens_limit)
  logprobs = body.get("logprobs", False)
  if logprobs is None:
    logprobs = False
  if not isinstance(logprobs, bool):
    raise RequestError(400, f"'logprobs' must be true or false, got {json.dumps(logprobs)[:40]}")
  top_logprobs = _number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
  if top_logprobs and not logprobs:
    raise RequestError(400, "'top_logprobs' needs 'logprobs': true")
  return ChatRequest(
      messages=[{"role": m["role"], "content": m["content"]} for m in messages],
      max_tokens=max_tokens,
      temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
      top_p=_number(body, "top_p", 1.0, float, 1e-6, 1.0),
      n=_number(body, "n", 1, int, 1, 16),
      seed=_number(body, "seed", 0, int, 0, 2**31 - 1),
      logprobs=logprobs, top_logprobs=top_logprobs)


# ----------------------------------------------------------------------------- log-probabilities

def token_text(lm: LanguageModel, token_id: int) -> str:
  """One token as text, special tokens spelled out (`<|im_end|>`), as OpenAI's `token` field."""
  return lm.tokenizer.decode([int(token_id)], skip_special=False)


def completion_logprobs(lm: LanguageModel, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                        intervention: intervene.Intervention | None = None) -> np.ndarray:
  """Log-softmax of the model at each completion position: [len(completion), V] float32.

  Row i is the distribution the model had over token i of the completion (temperature 1). The
  sequence is right-padded to a bucketed length so requests of similar length share a program;
  right padding cannot change earlier positions of a causal model.
  """
  ids = list(prompt_ids) + list(completion_ids)
  length = sampling.bucket(len(ids))
  padded = np.full((1, length), lm.tokenizer.pad_id, np.int32)  # [1, T]
  padded[0, :len(ids)] = ids
  mask = np.zeros((1, length), bool)
  mask[0, :len(ids)] = True
  generated = np.zeros((1, length), bool)  # steering "where" switches see the same split as the sampler
  generated[0, len(prompt_ids):len(ids)] = True
  kwargs = {} if intervention is None else {"intervention": intervention, "generated": generated}
  logits = lm.forward(padded, mask, **kwargs).logits  # [1, T, V]
  start = len(prompt_ids) - 1  # logits at t predict token t + 1
  rows = logits[0, start:start + len(completion_ids)]
  return np.asarray(jax.nn.log_softmax(rows.astype(np.float32), axis=-1))


def top_logprobs_entry(lm: LanguageModel, row_logprobs: np.ndarray, k: int) -> list[dict[str, Any]]:
  """The k most likely tokens of one position, OpenAI style: [{token, logprob, bytes}]."""
  if k == 0:
    return []
  top = np.argpartition(-row_logprobs, k - 1)[:k]
  top = top[np.argsort(-row_logprobs[top], kind="stable")]
  return [{"token": (text := token_text(lm, t)), "logprob": float(row_logprobs[t]),
           "bytes": list(text.encode("utf-8"))} for t in top]


def _logprobs_content(lm: LanguageModel, tokens: Sequence[int], rows: np.ndarray, k: int) -> list[dict[str, Any]]:
  content = []
  for index, token in enumerate(tokens):
    text = token_text(lm, token)
    content.append({"token": text, "logprob": float(rows[index, token]), "bytes": list(text.encode("utf-8")),
                    "top_logprobs": top_logprobs_entry(lm, rows[index], k)})
  return content


# ----------------------------------------------------------------------------- the handler logic

@dataclasses.dataclass
class ServedModel:
  """What the server answers with: the model, its served id, and limits."""
  lm: LanguageModel
  model_id: str
  intervention: intervene.Intervention | None = None
  max_prompt_tokens: int = 2048
  max_new_tokens_limit: int = 1024
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def chat_completion(served: ServedModel, request: ChatRequest) -> dict[str, Any]:
  """Runs one validated request; returns the OpenAI `chat.completion` object."""
  lm = served.lm
  try:
    prompt_ids = sampling.render_prompt(lm, request.messages, None, True)
  except Exception as error:  # a template that rejects this conversation (e.g. role order)
    raise RequestError(400, f"the model's chat template rejected these messages: {error}") from None
  if len(prompt_ids) > served.max_prompt_tokens:
    raise RequestError(400, f"the prompt is {len(prompt_ids)} tokens; this server accepts at most "
                            f"{served.max_prompt_tokens} (--max_prompt_tokens)", "context_length_exceeded")
  with served.lock:
    out = sampling.generate(lm, [prompt_ids], max_new_tokens=request.max_tokens, temperature=request.temperature,
                            top_p=request.top_p, seed=request.seed, num_samples=request.n,
                            intervention=served.intervention, batch_size=max(request.n, 1))
    rows = [completion_logprobs(lm, prompt_ids, tokens, served.intervention) if request.logprobs and tokens
            else None for tokens in out.token_ids]
  choices = []
  for index, (text, tokens, finished, row) in enumerate(zip(out.texts, out.token_ids, out.finished, rows)):
    logprobs = None
    if request.logprobs:
      logprobs = {"content": [] if row is None else _logprobs_content(lm, tokens, row, request.top_logprobs)}
    choices.append({"index": index, "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if finished else "length", "logprobs": logprobs})
  completion_tokens = sum(len(t) for t in out.token_ids)
  return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
          "model": served.model_id, "choices": choices,
          "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens}}


def models_listing(served: ServedModel) -> dict[str, Any]:
  return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": 0,
                                      "owned_by": "emjax"}]}


def error_body(message: str, error_type: str) -> dict[str, Any]:
  return {"error": {"message": message, "type": error_type}}


def make_handler(served: ServedModel) -> type[http.server.BaseHTTPRequestHandler]:
  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    quiet = False

    def _send(self, status: int, body: dict[str, Any]) -> None:
      data = json.dumps(body).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _drain(self, length: int) -> None:
      remaining = min(length, 16 * MAX_BODY_BYTES)
      while remaining > 0:
        chunk = self.rfile.read(min(remaining, 1 << 16))
        if not chunk:
          break
        remaining -= len(chunk)

    def log_message(self, format: str, *args: Any) -> None:  # one line per request, no bodies
      if not self.quiet:
        super().log_message(format, *args)

    def do_GET(self) -> None:
      path = self.path.split("?")[0].rstrip("/")
      if path in ("/v1/models", "/models"):
        self._send(200, models_listing(served))
      else:
        self._send(404, error_body(f"no route GET {path}; try /v1/models", "not_found"))

    def do_POST(self) -> None:
      path = self.path.split("?")[0].rstrip("/")
      try:
        if path not in ("/v1/chat/completions", "/chat/completions"):
          raise RequestError(404, f"no route POST {path}; try /v1/chat/completions", "not_found")
        try:
          length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
          raise RequestError(400, "Content-Length is not an integer") from None
        if length > MAX_BODY_BYTES:
          self._drain(length)  # read it anyway, so the client sees the 413 rather than a reset
          raise RequestError(413, f"request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        raw = self.rfile.read(length)
        try:
          body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
          raise RequestError(400, f"request body is not valid JSON: {error}") from None
        request = parse_chat_request(body, model_ids=[served.model_id],
                                     max_new_tokens_limit=served.max_new_tokens_limit)
        self._send(200, chat_completion(served, request))
      except RequestError as error:
        if error.status == 413:
          self.close_connection = True  # the unread body would be taken for the next request
        self._send(error.status, error_body(error.message, error.error_type))
      except Exception as error:  # a bug, not the client's fault: report it, keep serving
        self._send(500, error_body(f"internal error: {type(error).__name__}: {error}", "server_error"))

  return Handler


def make_server(lm: LanguageModel, *, host: str = "127.0.0.1", port: int = 8000, model_id: str | None = None,
                intervention: intervene.Intervention | None = None, max_prompt_tokens: int = 2048,
                max_new_tokens_limit: int = 1024, quiet: bool = False) -> http.server.ThreadingHTTPServer:
  """A ThreadingHTTPServer answering the OpenAI chat API with `lm` (port 0: any free port)."""
  if lm.tokenizer is None or lm.tokenizer.chat_template is None:
    raise ValueError(f"model {lm.name!r} has no chat template; the chat API needs one")
  served = ServedModel(lm, model_id or lm.name, intervention, max_prompt_tokens, max_new_tokens_limit)
  handler = make_handler(served)
  handler.quiet = quiet
  server = http.server.ThreadingHTTPServer((host, port), handler)
  server.daemon_threads = True
  server.served = served  # type: ignore[attr-defined]
  return server


def start_in_thread(server: http.server.ThreadingHTTPServer) -> threading.Thread:
  """Serves in a daemon thread (tests, notebooks); stop with server.shutdown()."""
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  return thread


def base_url(server: http.server.ThreadingHTTPServer) -> str:
  host, port = server.server_address[:2]
  return f"http://{host}:{port}/v1"
