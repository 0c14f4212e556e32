"""The OpenAI-compatible server (emjax/serve.py), queried by a real HTTP client (urllib).

The served model is the embedded SmolLM2-135M-Instruct; completions and log-probabilities are
checked against `emjax.generate` and an independent `lm.logits` forward on the unpadded sequence.
"""

import json
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

import emjax
from emjax import serve
from emjax.models import intervene

MESSAGES = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def server(smollm):
  srv = serve.make_server(smollm, port=0, max_prompt_tokens=64, max_new_tokens_limit=32, quiet=True)
  serve.start_in_thread(srv)
  yield srv
  srv.shutdown()
  srv.server_close()


def call(server, path, body=None, raw=None, method=None):
  """(status, decoded JSON) of one request; 4xx/5xx bodies are decoded too."""
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  request = urllib.request.Request(serve.base_url(server)[:-3] + path, data=data, method=method,
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as error:
    return error.code, json.loads(error.read())


def reference_logprobs(lm, prompt_ids, completion_ids, intervention=None):
  """log-softmax at each completion position from one unpadded forward: [N, V]."""
  ids = np.asarray([list(prompt_ids) + list(completion_ids)], np.int32)
  kwargs = {}
  if intervention is not None:
    generated = np.zeros(ids.shape, bool)
    generated[0, len(prompt_ids):] = True
    kwargs = {"intervention": intervention, "generated": generated}
  logits = lm.forward(ids, **kwargs).logits[0]
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return logp[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(completion_ids)]


def test_models_endpoint_lists_the_served_model(server, smollm):
  status, body = call(server, "/v1/models")
  assert status == 200
  assert body["object"] == "list"
  assert [m["id"] for m in body["data"]] == [smollm.name]


def test_completion_matches_generate_and_logprobs_match_logits(server, smollm):
  request = {"model": smollm.name, "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 2,
             "logprobs": True, "top_logprobs": 5}
  status, body = call(server, "/v1/chat/completions", request)
  assert status == 200, body
  assert body["object"] == "chat.completion" and body["model"] == smollm.name
  prompt_ids = smollm.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
  expected = emjax.generate(smollm, [MESSAGES], max_new_tokens=6, temperature=1.0, seed=11, num_samples=2)
  assert len(body["choices"]) == 2
  assert body["usage"]["prompt_tokens"] == len(prompt_ids)
  assert body["usage"]["completion_tokens"] == sum(len(t) for t in expected.token_ids)
  for index, choice in enumerate(body["choices"]):
    tokens = expected.token_ids[index]
    assert choice["index"] == index
    assert choice["message"] == {"role": "assistant", "content": expected.texts[index]}
    assert choice["finish_reason"] == ("stop" if expected.finished[index] else "length")
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [serve.token_text(smollm, t) for t in tokens]
    reference = reference_logprobs(smollm, prompt_ids, tokens)  # [N, V]
    got = np.array([c["logprob"] for c in content])
    np.testing.assert_allclose(got, reference[np.arange(len(tokens)), tokens], atol=2e-4)
    for position, entry in enumerate(content):
      top = entry["top_logprobs"]
      assert len(top) == 5
      want_ids = np.argsort(-reference[position])[:5]
      np.testing.assert_allclose([t["logprob"] for t in top], reference[position][want_ids], atol=2e-4)
      assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
      assert bytes(top[0]["bytes"]).decode("utf-8", "replace") == top[0]["token"]


def test_greedy_is_deterministic_and_without_logprobs_field(server, smollm):
  request = {"model": smollm.name, "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
  first = call(server, "/v1/chat/completions", request)[1]
  second = call(server, "/v1/chat/completions", {**request, "seed": 99})[1]
  greedy = emjax.generate(smollm, [MESSAGES], max_new_tokens=5, temperature=0)
  assert first["choices"][0]["message"]["content"] == greedy.texts[0]
  assert second["choices"][0]["message"]["content"] == greedy.texts[0]
  assert first["choices"][0]["logprobs"] is None


BAD_REQUESTS = {
    "malformed json": (None, b'{"model": "x", "messages": [', 400),
    "body not an object": (None, b"[1, 2]", 400),
    "unknown model": ({"model": "gpt-unknown", "messages": MESSAGES}, None, 404),
    "missing model": ({"messages": MESSAGES}, None, 400),
    "missing messages": ({"model": "SERVED"}, None, 400),
    "empty messages": ({"model": "SERVED", "messages": []}, None, 400),
    "bad role": ({"model": "SERVED", "messages": [{"role": "robot", "content": "hi"}]}, None, 400),
    "content not a string": ({"model": "SERVED", "messages": [{"role": "user", "content": 5}]}, None, 400),
    "over-long prompt": ({"model": "SERVED", "messages": [{"role": "user", "content": "word " * 200}]}, None, 400),
    "max_tokens over limit": ({"model": "SERVED", "messages": MESSAGES, "max_tokens": 10_000}, None, 400),
    "max_tokens a string": ({"model": "SERVED", "messages": MESSAGES, "max_tokens": "5"}, None, 400),
    "max_tokens a bool": ({"model": "SERVED", "messages": MESSAGES, "max_tokens": True}, None, 400),
    "temperature a string": ({"model": "SERVED", "messages": MESSAGES, "temperature": "hot"}, None, 400),
    "negative temperature": ({"model": "SERVED", "messages": MESSAGES, "temperature": -1}, None, 400),
    "top_logprobs > 20": ({"model": "SERVED", "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, None, 400),
    "top_logprobs without logprobs": ({"model": "SERVED", "messages": MESSAGES, "top_logprobs": 2}, None, 400),
    "logprobs not a bool": ({"model": "SERVED", "messages": MESSAGES, "logprobs": "yes"}, None, 400),
    "n zero": ({"model": "SERVED", "messages": MESSAGES, "n": 0}, None, 400),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_4xx_json_errors(server, smollm, case):
  body, raw, want_status = BAD_REQUESTS[case]
  if body is not None and body.get("model") == "SERVED":
    body = {**body, "model": smollm.name}
  status, answer = call(server, "/v1/chat/completions", body, raw=raw)
  assert status == want_status, answer
  assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type"}
  assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]


def test_unknown_route_is_404_and_server_survives_bad_requests(server, smollm):
  assert call(server, "/v1/completions", {"model": smollm.name})[0] == 404
  assert call(server, "/nope")[0] == 404
  status, body = call(server, "/v1/chat/completions", {"model": smollm.name, "messages": MESSAGES, "max_tokens": 1})
  assert status == 200 and len(body["choices"]) == 1


def test_oversized_body_is_413(server, smollm):
  raw = json.dumps({"model": smollm.name, "messages": MESSAGES, "pad": "x" * (serve.MAX_BODY_BYTES + 10)}).encode()
  status, body = call(server, "/v1/chat/completions", raw=raw)
  assert status == 413 and "limit" in body["error"]["message"]


def test_parse_chat_request_defaults_and_errors():
  request = serve.parse_chat_request({"model": "m", "messages": MESSAGES}, model_ids=["m"], max_new_tokens_limit=64)
  assert (request.max_tokens, request.temperature, request.top_p, request.n, request.logprobs) == (64, 1.0, 1.0, 1, False)
  with pytest.raises(serve.RequestError, match="out of range"):
    serve.parse_chat_request({"model": "m", "messages": MESSAGES, "top_p": 1.5}, model_ids=["m"],
                             max_new_tokens_limit=64)
  with pytest.raises(serve.RequestError, match="assistant"):
    serve.parse_chat_request({"model": "m", "messages": MESSAGES + [{"role": "assistant", "content": "x"}]},
                             model_ids=["m"], max_new_tokens_limit=64)


def test_load_steering_checks_files(smollm, tmp_path):
  good = tmp_path / "v.npy"
  np.save(good, np.ones(smollm.config.hidden_size, np.float32))
  iv = serve.load_steering(smollm, str(good), 3, 2.0)
  assert float(iv.steer_scale[3]) == 2.0 and float(np.abs(np.asarray(iv.steer_scale)).sum()) == 2.0
  assert serve.load_steering(smollm, None, None, 1.0) is None
  wrong = tmp_path / "w.npy"
  np.save(wrong, np.ones(7, np.float32))
  with pytest.raises(ValueError, match=r"w.npy: shape \(7,\); expected \(576,\)"):
    serve.load_steering(smollm, str(wrong), 3, 1.0)
  with pytest.raises(ValueError, match="needs --steer_layer"):
    serve.load_steering(smollm, str(good), None, 1.0)


@pytest.mark.slow
def test_steered_server_logprobs_include_the_intervention(smollm):
  vector = np.random.default_rng(0).normal(size=smollm.config.hidden_size).astype(np.float32)
  iv = intervene.steer(smollm.config, 10, vector, 8.0)
  srv = serve.make_server(smollm, port=0, intervention=iv, quiet=True)
  serve.start_in_thread(srv)
  try:
    request = {"model": smollm.name, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True}
    steered = call(srv, "/v1/chat/completions", request)[1]["choices"][0]
  finally:
    srv.shutdown()
    srv.server_close()
  expected = emjax.generate(smollm, [MESSAGES], max_new_tokens=4, temperature=0, intervention=iv)
  plain = emjax.generate(smollm, [MESSAGES], max_new_tokens=4, temperature=0)
  assert steered["message"]["content"] == expected.texts[0] != plain.texts[0]
  prompt_ids = smollm.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
  tokens = expected.token_ids[0]
  reference = reference_logprobs(smollm, prompt_ids, tokens, iv)
  np.testing.assert_allclose([c["logprob"] for c in steered["logprobs"]["content"]],
                             reference[np.arange(len(tokens)), tokens], atol=2e-4)
