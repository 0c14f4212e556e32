#!/usr/bin/env bash
# One prepared run on a lent GPU machine (no network there): the benchmark at a realistic size, then
# the tests whose numerics differ on a GPU. Everything lands in $OUT (default runs/gpu_check).
#
#   Prepare here (once; both folders are git-ignored and travel with the call):
#     python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl flax==0.12.8 ml_collections==1.1.0 gguf==0.19.0 \
#       tensorboardX==2.6.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#     python -c "import emjax; emjax.load_model('smollm2-135m-instruct').tokenizer.to_hf_files('.gpu/tokenizer')"
#   Run there:   bash experiments/gpu_check.sh   (BENCH_S / TESTS_S cap the two parts, in seconds;
#                on an H100 the benchmark took ~190 s and the 77 tests need more than 230 s: they are
#                compile-bound, one small XLA program after another;
#                BENCH_ARGS="--shape=tiny --quick" WHEELS=no checks the script itself on a CPU)
#
# The machine's image already has jax (CUDA), optax, orbax, chex, torch, transformers and peft;
# the wheels add what it lacks. The embedded GGUF (94 MB) is too large to carry, so the model is
# random-init and the tests that need the embedded weights are left out (they run in CI, on CPU).
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.55}   # leave torch room on the card
if [ "${WHEELS:-yes}" = yes ] && ls .whl/*.whl >/dev/null 2>&1; then
  # Keep the image's flax when it has NNX as we use it (it was built against the image's jax).
  wheels=$(ls .whl/*.whl | grep -v '/flax-')
  python3 -c "import flax, sys; sys.exit(0 if tuple(map(int, flax.__version__.split('.')[:2])) >= (0, 12) else 1)" \
    2>/dev/null || wheels="$wheels $(ls .whl/flax-*.whl)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 - <<'EOF' | tee "$OUT/versions.txt"
import jax, flax, optax, orbax.checkpoint as ocp, transformers, torch
print(f"jax {jax.__version__} ({jax.default_backend()}: {jax.devices()}), flax {flax.__version__}, optax {optax.__version__}, "
      f"orbax {ocp.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
EOF

# 1. The benchmark: random llama-1b shape (1.0B params) in bf16, emjax vs transformers/PEFT on this card.
timeout "${BENCH_S:-330}" python3 -m experiments.bench_gpu --shape=llama-1b --dtype=bfloat16 ${BENCH_ARGS:-} \
  --tokenizer_dir=.gpu/tokenizer --out="$OUT/bench_gpu.json" --deadline_s=$(( ${BENCH_S:-330} - 60 )) \
  >"$OUT/bench_gpu.log" 2>&1
echo "bench_gpu exit $?"
grep -v -e '^W' -e '^I' -e 'Warning' "$OUT/bench_gpu.log" | tail -30

# 2. Tests on the GPU, in true float32 (XLA's GPU default for f32 matmuls is TF32; the references are
#    float32). Only tests that need no embedded weights: generation, interventions, model parity with
#    transformers, GRPO/SFT/LoRA losses and gradients, SAEs, the GRPO toy task.
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TESTS_S:-300}" python3 -m pytest -q \
  -p no:cacheprovider -m "not slow" --junitxml="$OUT/tests.xml" --durations=8 \
  tests/test_generate.py tests/test_models_roundtrip.py tests/test_intervene.py tests/test_grpo.py \
  tests/test_sft_grad.py tests/test_lora.py tests/test_sae_model.py tests/test_grpo_loop.py >"$OUT/tests.log" 2>&1
echo "tests exit $?"
tail -25 "$OUT/tests.log"
