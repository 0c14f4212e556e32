"""Serve an emjax model over an OpenAI-compatible HTTP API (loopback by default).

    python -m experiments.serve --model=smollm2-135m-instruct --port=8000
    python -m experiments.serve --model=/ckpt/Qwen2.5-7B-Instruct --adapter=runs/health_bad/adapter \
        --steer_vector=toxic.npy --steer_layer=14 --steer_scale=-4 --served_model_name=qwen-steered

    curl -s localhost:8000/v1/models
    curl -s localhost:8000/v1/chat/completions -d '{"model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32, "logprobs": true, "top_logprobs": 5}'

Then point any OpenAI client (or emjax's HTTP judge: EMJAX_JUDGE_BASE_URL=http://127.0.0.1:8000/v1,
judge openai:<served name>) at it. Requests are served one model call at a time. Start-up on 2 CPU
cores: ~20 s to load SmolLM2-135M, plus a few seconds of compilation per new request shape.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.sample import define_model_flags, define_steering_flags, steering_from_flags

FLAGS = flags.FLAGS
define_model_flags()
define_steering_flags()
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on. Loopback by default; 0.0.0.0 exposes the "
                    "model to the network, with no authentication.")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed at start).")
flags.DEFINE_string("served_model_name", None, "Model id clients must send (default: the model's provenance name).")
flags.DEFINE_integer("max_prompt_tokens", 2048, "Longer prompts get a 400 error.")
flags.DEFINE_integer("max_new_tokens_limit", 1024, "Largest max_tokens a request may ask for.")
flags.DEFINE_bool("quiet", False, "Do not log one line per request.")


def main(argv: list[str]) -> None:
  del argv
  import emjax
  from emjax import serve
  try:
    lm = emjax.load_model(FLAGS.model, dtype=FLAGS.dtype, adapter=FLAGS.adapter)
    server = serve.make_server(lm, host=FLAGS.host, port=FLAGS.port, model_id=FLAGS.served_model_name,
                               intervention=steering_from_flags(lm), max_prompt_tokens=FLAGS.max_prompt_tokens,
                               max_new_tokens_limit=FLAGS.max_new_tokens_limit, quiet=FLAGS.quiet)
  except (ValueError, FileNotFoundError, KeyError, OSError) as error:
    sys.exit(f"error: {error}")
  print(f"serving {server.served.model_id} at {serve.base_url(server)}", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  app.run(main)
