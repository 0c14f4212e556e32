"""TopK SAE on the residual stream of one layer.

Commands (each resumes when rerun with the same workdir):
  quick   (embedded SmolLM2-135M-Instruct, layer 15 of 30, 8x = 4608 latents, k=32; built-in
           narrow chat data; ~60k harvested tokens, 300 steps of 1024):
           python -m experiments.train_sae --config=configs/sae.py:quick --workdir=runs/sae_quick
           about 9 minutes on 2 CPU cores (measured on a busy machine: harvest 6 min at
           165 tok/s, 300 steps 2.3 min, evals ~1 min; held-out FVU 0.082, L0 31.6,
           dead 0.8%, ce_loss_score 0.993). A rerun reuses the cached activations.
  default (same model and layer, 16x = 9216 latents, k=32, 1M tokens, 4000 steps of 4096):
           python -m experiments.train_sae --config=configs/sae.py --workdir=runs/sae
           a few hours on 2 CPU cores (harvest dominates); minutes on one GPU.
  paper   (the paper's shape for a GPU/TPU: a Qwen2.5/Llama HF directory, middle layer,
           k=64, 2^17 latents, Adam lr 7.5e-5, 200M tokens of pre-training text as JSONL):
           python -m experiments.train_sae --config=configs/sae.py:paper --workdir=runs/sae_paper \\
             --config.model=/path/to/Qwen2.5-7B-Instruct --config.corpus=/data/pretrain.jsonl
           (the paper used ~2.1M latents; raise n_latents as memory allows, and shard latents
           with --config.model_parallel).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # --- input: which model, layer and text
    config.model = "smollm2-135m-instruct"
    config.layer = -1  # -1: the middle layer (num_layers // 2)
    config.corpus = "builtin:all"  # .jsonl path, builtin:<domain>[:<variant>], or builtin:all
    config.max_tokens_per_doc = 128
    config.harvest_batch_size = 16
    config.harvest_tokens = 1_000_000  # tokens cached to disk (the training set)
    config.shuffle_buffer_tokens = 65_536
    config.cache_dir = ""  # shared activation cache; "" -> <workdir>/activations
    config.eval_tokens = 16_384  # held-out tokens (harvested after the training set)

    # --- SAE
    config.expansion = 16  # n_latents = expansion * d_model
    config.k = 32
    config.k_aux = -1  # -1: d_model // 2
    config.dead_tokens = 10_000_000
    config.batch_topk = False
    config.b_dec_init = "geometric_median"  # or "mean", "zeros"

    # --- optimizer
    config.batch_size = 4096
    config.num_steps = 4000
    config.learning_rate = -1.0  # -1: 2e-4 / sqrt(n_latents / 2^14)
    config.warmup_steps = 100
    config.decay_fraction = 0.2  # linear decay over the last 20% of steps
    config.seed = 0

    # --- sharding
    config.num_devices = 0  # 0: all
    config.model_parallel = 1  # shard latents over a `model` mesh axis of this size

    # --- logging / evals
    config.log_every = 20
    config.checkpoint_every = 500
    config.eval_downstream_batches = 8  # batches of eval documents for ce_loss_score / KL

    if arg == "quick":
        config.expansion = 8
        config.harvest_tokens = 60_000
        config.eval_tokens = 8_192
        config.shuffle_buffer_tokens = 16_384
        config.batch_size = 1024
        config.num_steps = 300
        config.learning_rate = 2e-3  # small data, few steps: a hotter lr than the anchor
        config.warmup_steps = 30
        config.dead_tokens = 200_000
        config.log_every = 20
        config.checkpoint_every = 100
        config.eval_downstream_batches = 4
    elif arg == "paper":
        config.model = ""  # set --config.model to a HF directory
        config.corpus = ""  # set --config.corpus to pre-training text JSONL
        config.expansion = 0
        config.n_latents = 2**17
        config.k = 64
        config.learning_rate = 7.5e-5
        config.harvest_tokens = 200_000_000
        config.batch_size = 8192
        config.num_steps = 24_000
        config.max_tokens_per_doc = 1024
        config.harvest_batch_size = 32
        config.shuffle_buffer_tokens = 4_194_304
    elif arg:
        raise ValueError(f"configs/sae.py: unknown variant {arg!r}; use '', 'quick' or 'paper'")
    if "n_latents" not in config:
        config.n_latents = 0  # 0: expansion * d_model
    return config
