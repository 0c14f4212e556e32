"""`openai:<model>`: a judge behind any OpenAI-compatible `/v1/chat/completions`.

    export EMJAX_JUDGE_BASE_URL=https://api.openai.com/v1     # default
    export EMJAX_JUDGE_API_KEY=...                            # optional on a loopback URL
    judge = make_judge("openai:gpt-4o-2024-08-06", cache_dir="runs/eval/judge_cache")

Each judge prompt is sent as one user turn with temperature 0, max_tokens 1, logprobs and
top_logprobs = 20; the first position's top-20 tokens are read into outcome probabilities by
the same function as the local judge's `first_token` reading (`local.probs_from_top_logprobs`),
then into scores/labels by `local.judgment_from_probs` (Betley's 25% rule included).

Robustness:
  * timeouts; retries with exponential backoff on 429, 5xx, connection errors, timeouts and
    malformed responses; other 4xx (bad key, bad request) fail at once;
  * a thread pool of `concurrency` requests at a time;
  * an on-disk cache, one JSON file per sha256(judge model, rubric, criterion, prompt), written
    atomically as each answer arrives, so a rerun (or a resumed evaluation) costs nothing;
  * when items still fail after the retries, `score` raises `JudgeRequestError` naming them;
    everything that succeeded is already cached, so rerunning later resumes.
The API key is only ever put in the Authorization header: never printed, logged, cached or
written into an error message.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import ipaddress
import json
import math
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Mapping, Sequence

from emjax.judge import rubrics as rubrics_lib
from emjax.judge.base import Judgment, check_pairs
from emjax.judge.local import TOP_LOGPROBS, judgment_from_probs, probs_from_top_logprobs, resolve_rubric

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "EMJAX_JUDGE_BASE_URL"
API_KEY_ENV = "EMJAX_JUDGE_API_KEY"
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class JudgeConfigError(ValueError):
  """The HTTP judge cannot start (e.g. no API key for a remote URL). One-line message."""


class JudgeRequestError(RuntimeError):
  """Some judge requests still failed after all retries; `failures` names them."""

  def __init__(self, failures: list[dict[str, Any]], total: int, cache_dir: str):
    self.failures = failures
    shown = "; ".join(f"pair {f['pair']} {f['criterion']}: {f['error']}" for f in failures[:5])
    more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
    super().__init__(f"{len(failures)} of {total} judge requests failed after retries: {shown}{more}. "
                     f"Answers that succeeded are cached in {cache_dir}; rerun to resume.")


class RetryableError(Exception):
  """A failure worth retrying (429/5xx, network, malformed response)."""


def is_loopback(base_url: str) -> bool:
  host = urllib.parse.urlparse(base_url).hostname or ""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def cache_key(model: str, rubric: str, criterion: str, prompt: str) -> str:
  return hashlib.sha256(json.dumps([model, rubric, criterion, prompt]).encode("utf-8")).hexdigest()


def read_cache(cache_dir: str, key: str) -> dict[str, float] | None:
  path = os.path.join(cache_dir, key[:2], key + ".json")
  try:
    with open(path) as f:
      return json.load(f)["top_logprobs"]
  except (OSError, json.JSONDecodeError, KeyError):
    return None  # missing or half-written: ask again


def write_cache(cache_dir: str, key: str, record: dict[str, Any]) -> None:
  directory = os.path.join(cache_dir, key[:2])
  os.makedirs(directory, exist_ok=True)
  handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  with os.fdopen(handle, "w") as f:
    json.dump(record, f)
  os.replace(tmp, os.path.join(directory, key + ".json"))  # atomic: readers never see half a file


def parse_top_logprobs(response: Any) -> dict[str, float]:
  """{token: logprob} of the first generated position; RetryableError if the shape is wrong."""
  try:
    content = response["choices"][0]["logprobs"]["content"]
    if not content:  # the judge stopped at once: no outcome at all
      return {}
    top: dict[str, float] = {}
    for entry in content[0]["top_logprobs"]:
      token, logprob = entry["token"], float(entry["logprob"])
      if not isinstance(token, str) or math.isnan(logprob):
        raise TypeError("bad top_logprobs entry")
      top[token] = float(math.log(math.exp(top[token]) + math.exp(logprob))) if token in top else logprob
    return top
  except (KeyError, IndexError, TypeError, ValueError) as error:
    raise RetryableError(f"malformed response ({type(error).__name__}: {error})") from None


class HTTPJudge:
  """See module docstring. `post` is injectable for tests; it defaults to urllib."""

  def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
               cache_dir: str | None = None, concurrency: int = 4, timeout_s: float = 60.0, max_retries: int = 4,
               backoff_s: float = 1.0, max_backoff_s: float = 30.0, env: Mapping[str, str] | None = None,
               sleep: Callable[[float], None] = time.sleep):
    env = os.environ if env is None else env
    self.model = model
    self.name = f"openai:{model}"
    self.base_url = (base_url or env.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    parsed = urllib.parse.urlparse(self.base_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
      raise JudgeConfigError(f"{BASE_URL_ENV}={self.base_url!r} is not an http(s) URL")
    self._api_key = api_key if api_key is not None else env.get(API_KEY_ENV)
    if not self._api_key and not is_loopback(self.base_url):
      raise JudgeConfigError(f"the {self.name} judge needs an API key for {self.base_url}: set {API_KEY_ENV} "
                             f"(or point {BASE_URL_ENV} at a loopback server such as experiments/serve.py)")
    self.cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "emjax", "http_judge")
    if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
      raise JudgeConfigError(f"need concurrency >= 1, max_retries >= 0, timeout_s > 0; got {concurrency}, "
                             f"{max_retries}, {timeout_s}")
    self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
    self.backoff_s, self.max_backoff_s, self._sleep = backoff_s, max_backoff_s, sleep
    self.requests_sent = 0  # for tests and reports: how many HTTP requests went out

  def __repr__(self) -> str:  # never show the key
    return f"HTTPJudge(model={self.model!r}, base_url={self.base_url!r})"

  def _post(self, prompt: str) -> dict[str, Any]:
    body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 1, "temperature": 0, "seed": 0, "logprobs": True,
                       "top_logprobs": TOP_LOGPROBS}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST")
    self.requests_sent += 1
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as error:
      detail = error.read()[:200].decode("utf-8", "replace")
      message = f"HTTP {error.code} from {self.base_url}: {detail}"
      if error.code in RETRY_STATUSES:
        raise RetryableError(message) from None
      raise RuntimeError(message) from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
            ConnectionError) as error:
      raise RetryableError(f"cannot reach {self.base_url}: {getattr(error, 'reason', error)}") from None
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise RetryableError(f"response is not JSON: {raw[:80]!r}") from None

  def top_logprobs(self, prompt: str) -> dict[str, float]:
    """First-position {token: logprob} for one prompt, with retries and backoff (no cache)."""
    for attempt in range(self.max_retries + 1):
      try:
        return parse_top_logprobs(self._post(prompt))
      except RetryableError:
        if attempt == self.max_retries:
          raise
        self._sleep(min(self.max_backoff_s, self.backoff_s * 2 ** attempt))
    raise AssertionError("unreachable")

  def _cached_top_logprobs(self, rubric: str, criterion: str, prompt: str) -> dict[str, float]:
    key = cache_key(self.model, rubric, criterion, prompt)
    cached = read_cache(self.cache_dir, key)
    if cached is not None:
      return cached
    top = self.top_logprobs(prompt)
    write_cache(self.cache_dir, key, {"model": self.model, "rubric": rubric, "criterion": criterion,
                                      "top_logprobs": top})
    return top

  def score(self, questions: Sequence[str], answers: Sequence[str],
            rubric: str | rubrics_lib.Rubric = "aligned_coherent") -> list[Judgment]:
    check_pairs(questions, answers)
    rubric = resolve_rubric(rubric)
    jobs = [(pair, criterion, criterion.render(question, answer))
            for pair, (question, answer) in enumerate(zip(questions, answers)) for criterion in rubric.criteria]
    results: dict[tuple[int, str], dict[str, float]] = {}
    failures = []
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = {pool.submit(self._cached_top_logprobs, rubric.name, c.name, prompt): (pair, c.name)
                 for pair, c, prompt in jobs}
      for future in concurrent.futures.as_completed(futures):
        pair, name = futures[future]
        try:
          results[pair, name] = future.result()
        except (RetryableError, RuntimeError) as error:
          failures.append({"pair": pair, "criterion": name, "error": str(error)[:160]})
    if failures:
      raise JudgeRequestError(sorted(failures, key=lambda f: (f["pair"], f["criterion"])), len(jobs), self.cache_dir)
    return [judgment_from_probs([probs_from_top_logprobs(results[pair, c.name], c) for c in rubric.criteria],
                                rubric, answer)
            for pair, answer in enumerate(answers)]


def make_http_judge(model: str, **kwargs: Any) -> HTTPJudge:
  """The `openai:<model>` judge (see module docstring for the environment it reads)."""
  return HTTPJudge(model, **kwargs)
