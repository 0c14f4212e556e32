"""TopK sparse autoencoder: parameters, encode/decode, loss.

    pre    = encoder_w (x - decoder_b) + encoder_b            # [B, N]
    z      = ReLU(TopK(pre))                                   # k non-zeros per token
    x_hat  = decoder_w^T z + decoder_b                         # [B, D]

Weights are stored row-major per latent, like sparsify: ``encoder_w`` and ``decoder_w`` are
both ``[N, D]`` (N latents, D model width), so gathering the k active latents' rows is a
contiguous read. The SAELens file layout (``W_enc [D, N]``) is produced by ``files.py``.

Why the sparse paths: at d=576, N=9216, B=4096 the encoder matmul is 43 GFLOP, while the k=32
active latents touch only B*k*D = 75 M numbers. A dense decode (``z @ W_dec``) and the dense
encoder gradient (``x^T @ d_pre`` with d_pre [B, N] mostly zero) would each cost another
43 GFLOP; here the decode gathers k decoder rows per token and the encoder's backward is a
custom VJP that scatter-adds into the k selected rows only.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp

# Pre-activations of latents excluded from the AuxK pick (alive ones) are set to this; ReLU
# turns them to 0. A finite value keeps 0 * value products NaN-free.
_EXCLUDED = -1e30


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Static shape and loss settings; hashable so it can be a static jit argument."""

    d_in: int  # width D of the residual stream the SAE reads
    n_latents: int  # N dictionary size
    k: int  # active latents per token
    k_aux: int | None = None  # latents used by AuxK; None -> d_in // 2 (Gao et al.)
    dead_tokens: int = 10_000_000  # a latent that has not fired for this many tokens is dead
    aux_coef: float = 1.0 / 32.0  # AuxK loss weight (Gao et al.)
    batch_topk: bool = False  # keep the B*k largest activations of the batch instead of k/token
    batch_topk_cap: int = 4  # BatchTopK candidates per token = batch_topk_cap * k (see encode)

    def __post_init__(self):
        for name in ("d_in", "n_latents", "k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SAEConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.k > self.n_latents:
            raise ValueError(f"SAEConfig.k={self.k} exceeds n_latents={self.n_latents}")

    @property
    def aux_k(self) -> int:
        return min(self.n_latents, self.k_aux if self.k_aux is not None else max(1, self.d_in // 2))

    @property
    def candidates_per_token(self) -> int:
        """Latents picked per token before the batch threshold (== k without BatchTopK)."""
        if not self.batch_topk:
            return self.k
        return min(self.n_latents, self.batch_topk_cap * self.k)


@flax.struct.dataclass
class SAEParams:
    encoder_w: jax.Array  # [N, D]
    encoder_b: jax.Array  # [N]
    decoder_w: jax.Array  # [N, D], rows unit-norm
    decoder_b: jax.Array  # [D]


def default_learning_rate(n_latents: int) -> float:
    """Adam lr scaled like Gao et al.: 2e-4 at 2^14 latents, times 1/sqrt(N / 2^14)."""
    return 2e-4 / (n_latents / 2**14) ** 0.5


def normalize_rows(matrix: jax.Array) -> jax.Array:
    """Scale each row to unit L2 norm. # [N, D] -> [N, D]"""
    norms = jnp.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / jnp.maximum(norms, 1e-12)


def geometric_median(points: jax.Array, num_iters: int = 50) -> jax.Array:
    """Weiszfeld iterations for argmin_m sum_i ||points_i - m||. # [S, D] -> [D]

    The b_dec init of Gao et al.: robust to the few huge-norm tokens a residual stream has.
    """
    points = jnp.asarray(points, jnp.float32)

    def step(median, _):
        dist = jnp.linalg.norm(points - median, axis=-1)  # [S]
        weights = 1.0 / jnp.maximum(dist, 1e-6)
        return (weights[:, None] * points).sum(0) / weights.sum(), None

    median, _ = jax.lax.scan(step, points.mean(0), None, length=num_iters)
    return median


def init_params(
    config: SAEConfig, key: jax.Array, decoder_bias: jax.Array | None = None
) -> SAEParams:
    """Random unit-norm decoder, encoder tied to it at init (Gao et al.), zero encoder bias.

    ``decoder_bias`` is the geometric median (or mean) of a data sample; zeros when None.
    """
    decoder_w = normalize_rows(
        jax.random.normal(key, (config.n_latents, config.d_in), jnp.float32)
    )  # [N, D]
    if decoder_bias is None:
        decoder_bias = jnp.zeros((config.d_in,), jnp.float32)
    decoder_bias = jnp.asarray(decoder_bias, jnp.float32)
    if decoder_bias.shape != (config.d_in,):
        raise ValueError(f"decoder_bias has shape {decoder_bias.shape}, expected ({config.d_in},)")
    return SAEParams(
        encoder_w=jnp.array(decoder_w, copy=True),  # own buffer: the state is donated
        encoder_b=jnp.zeros((config.n_latents,), jnp.float32),
        decoder_w=decoder_w,
        decoder_b=decoder_bias,
    )


# ---------------------------------------------------------------------------------------------
# Sparse row kernels
#
# XLA:CPU executes a gather with [B, C] indices into a [B, C, D] buffer slowly (measured: ~0.6 s
# at B=4096, C=32, D=576), while C gathers with [B] indices, multiplied and summed, fuse into
# one loop (~0.05 s). So the sparse ops below loop over the C slots: unrolled when C is small,
# a fori_loop otherwise (AuxK's k_aux = D/2).
# ---------------------------------------------------------------------------------------------

_UNROLL_SLOTS = 64


def gather_weighted_sum(weights: jax.Array, ids: jax.Array, table: jax.Array) -> jax.Array:
    """sum_j weights[b, j] * table[ids[b, j]]. # [B, C], [B, C], [N, D] -> [B, D]"""
    # The barrier stops XLA from fusing the producers of weights/ids (top-k of the encoder
    # matmul) into the slot loop, which re-ran them per slot (measured 10x slower).
    weights, ids = jax.lax.optimization_barrier((weights, ids))
    slots = ids.shape[1]
    if slots <= _UNROLL_SLOTS:
        total = weights[:, 0, None] * table[ids[:, 0]]
        for slot in range(1, slots):
            total = total + weights[:, slot, None] * table[ids[:, slot]]
        return total

    def body(slot, total):
        return total + weights[:, slot, None] * table[ids[:, slot]]

    return jax.lax.fori_loop(0, slots, body, jnp.zeros((ids.shape[0], table.shape[1]), table.dtype))


def scatter_weighted_rows(
    weights: jax.Array, ids: jax.Array, rows: jax.Array, n_latents: int
) -> jax.Array:
    """out[n] = sum over (b, j) with ids[b, j] == n of weights[b, j] * rows[b]. -> [N, D]"""

    weights, ids, rows = jax.lax.optimization_barrier((weights, ids, rows))

    def body(slot, out):
        return out.at[ids[:, slot]].add(weights[:, slot, None] * rows)

    return jax.lax.fori_loop(
        0, ids.shape[1], body, jnp.zeros((n_latents, rows.shape[1]), rows.dtype)
    )


def gather_dots(vectors: jax.Array, ids: jax.Array, table: jax.Array) -> jax.Array:
    """out[b, j] = vectors[b] . table[ids[b, j]]. # [B, D], [B, C], [N, D] -> [B, C]"""
    vectors, ids = jax.lax.optimization_barrier((vectors, ids))  # see gather_weighted_sum
    slots = ids.shape[1]
    if slots <= _UNROLL_SLOTS:
        return jnp.stack(
            [jnp.sum(vectors * table[ids[:, slot]], axis=-1) for slot in range(slots)], axis=1
        )

    def body(slot, out):
        return out.at[:, slot].set(jnp.sum(vectors * table[ids[:, slot]], axis=-1))

    return jax.lax.fori_loop(0, slots, body, jnp.zeros(ids.shape, vectors.dtype))


@jax.custom_vjp
def sparse_decode(acts: jax.Array, ids: jax.Array, decoder_w: jax.Array) -> jax.Array:
    """sum_j acts[b, j] * decoder_w[ids[b, j]], with a scatter-add backward. -> [B, D]"""
    return gather_weighted_sum(acts, ids, decoder_w)


def _sparse_decode_fwd(acts, ids, decoder_w):
    return sparse_decode(acts, ids, decoder_w), (acts, ids, decoder_w)


def _sparse_decode_bwd(residuals, d_out):
    acts, ids, decoder_w = residuals
    d_acts = gather_dots(d_out, ids, decoder_w)  # [B, C]
    d_decoder_w = scatter_weighted_rows(acts, ids, d_out, decoder_w.shape[0])  # [N, D]
    return d_acts, None, d_decoder_w


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


# ---------------------------------------------------------------------------------------------
# Encoder with a sparse backward
# ---------------------------------------------------------------------------------------------


def _select(pre: jax.Array, k: int, k_aux: int, dead_mask: jax.Array):
    """Top-k of the pre-activations, plus top-k_aux among dead latents (AuxK)."""
    vals, ids = jax.lax.top_k(pre, k)  # [B, k]

    def aux_pick():
        return tuple(jax.lax.top_k(jnp.where(dead_mask[None, :], pre, _EXCLUDED), k_aux))

    def no_aux():
        batch = pre.shape[0]
        return (
            jnp.full((batch, k_aux), _EXCLUDED, pre.dtype),
            jnp.zeros((batch, k_aux), jnp.int32),
        )

    # When nothing is dead (most steps) the second top-k is skipped at run time.
    aux_vals, aux_ids = jax.lax.cond(jnp.any(dead_mask), aux_pick, no_aux)
    return vals, ids, aux_vals, aux_ids


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def topk_preacts(
    x: jax.Array,  # [B, D] input activations
    decoder_b: jax.Array,  # [D] subtracted before encoding
    encoder_w: jax.Array,  # [N, D]
    encoder_b: jax.Array,  # [N]
    k: int,
    k_aux: int,
    dead_mask: jax.Array,  # [N] bool
):
    """Pre-activations of the k largest latents per token (and of k_aux dead ones).

    Returns (vals [B, k], ids [B, k], aux_vals [B, k_aux], aux_ids [B, k_aux]). Only the
    selected values carry gradient: the backward scatter-adds into the selected rows of
    encoder_w instead of multiplying by a dense [B, N] gradient.
    """
    pre = (x - decoder_b) @ encoder_w.T + encoder_b  # [B, N]
    return _select(pre, k, k_aux, dead_mask)


def _topk_preacts_fwd(x, decoder_b, encoder_w, encoder_b, k, k_aux, dead_mask):
    outputs = topk_preacts(x, decoder_b, encoder_w, encoder_b, k, k_aux, dead_mask)
    _, ids, _, aux_ids = outputs
    return outputs, (x - decoder_b, encoder_w, ids, aux_ids, dead_mask)


def _scatter_rows(centered, d_pre, ids, n_latents):
    """sum over (b, j) with ids[b, j] == n of d_pre[b, j] * centered[b] -> [N, D], and -> [N]."""
    d_w = scatter_weighted_rows(d_pre, ids, centered, n_latents)
    d_b = jnp.zeros((n_latents,), d_pre.dtype).at[ids.reshape(-1)].add(d_pre.reshape(-1))
    return d_w, d_b


def _topk_preacts_bwd(k, k_aux, residuals, cotangents):
    centered, encoder_w, ids, aux_ids, dead_mask = residuals
    d_vals, _, d_aux_vals, _ = cotangents
    n_latents = encoder_w.shape[0]
    d_encoder_w, d_encoder_b = _scatter_rows(centered, d_vals, ids, n_latents)

    def add_aux(grads):  # AuxK rows only exist on steps with dead latents
        aux_w, aux_b = _scatter_rows(centered, d_aux_vals, aux_ids, n_latents)
        return grads[0] + aux_w, grads[1] + aux_b

    d_encoder_w, d_encoder_b = jax.lax.cond(
        jnp.any(dead_mask), add_aux, lambda grads: grads, (d_encoder_w, d_encoder_b)
    )
    # d x[b] = sum_j d_pre[b, j] * encoder_w[ids[b, j]]: a gather that XLA drops when x is
    # data (as in training). decoder_b's gradient is minus its batch sum, which collapses to
    # a matvec with the per-latent totals already in d_encoder_b.
    d_x = gather_weighted_sum(d_vals, ids, encoder_w) + gather_weighted_sum(
        d_aux_vals, aux_ids, encoder_w
    )
    d_decoder_b = -(d_encoder_b @ encoder_w)  # [D]
    return d_x, d_decoder_b, d_encoder_w, d_encoder_b, None


topk_preacts.defvjp(_topk_preacts_fwd, _topk_preacts_bwd)


def _apply_batch_threshold(acts: jax.Array, kept_total: int) -> jax.Array:
    """BatchTopK: zero all but the ``kept_total`` largest activations of the batch.

    acts [B, C] holds each token's C = cap*k largest candidates, so a token can keep up to
    C latents (an approximation of exact BatchTopK that keeps shapes static; a token wanting
    more than C is rare for cap >= 4).
    """
    flat = jax.lax.stop_gradient(acts).reshape(-1)
    threshold = jax.lax.top_k(flat, kept_total)[0][-1]
    return jnp.where(acts >= jnp.maximum(threshold, 1e-12), acts, 0.0)


def encode(
    params: SAEParams, config: SAEConfig, x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sparse code of x. # [B, D] -> (acts [B, C], latent_ids [B, C]), C = k (or cap*k).

    Entries whose activation is 0 are inactive (ReLU after top-k, or BatchTopK threshold).
    """
    acts, ids, _, _ = _encode_with_aux(
        params, config, x, jnp.zeros((config.n_latents,), bool)
    )
    return acts, ids


def _encode_with_aux(params, config, x, dead_mask):
    vals, ids, aux_vals, aux_ids = topk_preacts(
        x,
        params.decoder_b,
        params.encoder_w,
        params.encoder_b,
        config.candidates_per_token,
        config.aux_k,
        dead_mask,
    )
    acts = jax.nn.relu(vals)  # [B, C]
    if config.batch_topk:
        acts = _apply_batch_threshold(acts, x.shape[0] * config.k)
    return acts, ids, jax.nn.relu(aux_vals), aux_ids


def decode(params: SAEParams, acts: jax.Array, latent_ids: jax.Array) -> jax.Array:
    """Reconstruction from the sparse code, gathering only the active decoder rows.

    # acts [B, C], latent_ids [B, C] -> [B, D]
    """
    return sparse_decode(acts, latent_ids, params.decoder_w) + params.decoder_b


def dense_latents(acts: jax.Array, latent_ids: jax.Array, n_latents: int) -> jax.Array:
    """Scatter a sparse code into a dense latent vector. # [B, C] -> [B, N]"""
    rows = jnp.arange(acts.shape[0])[:, None]
    return jnp.zeros((acts.shape[0], n_latents), acts.dtype).at[rows, latent_ids].add(acts)


def decode_dense(params: SAEParams, latents: jax.Array) -> jax.Array:
    """Reference dense decode z @ W_dec + b_dec (tests, analysis). # [B, N] -> [B, D]"""
    return latents @ params.decoder_w + params.decoder_b


def reconstruct(params: SAEParams, config: SAEConfig, x: jax.Array) -> jax.Array:
    """x -> x_hat. # [B, D] -> [B, D]"""
    acts, ids = encode(params, config, x)
    return decode(params, acts, ids)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def fraction_of_variance_unexplained(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch. # [B, D] -> []"""
    total = jnp.sum(jnp.square(x - x.mean(0, keepdims=True)))
    return jnp.sum(jnp.square(x - x_hat)) / jnp.maximum(total, 1e-12)


def loss_fn(
    params: SAEParams, config: SAEConfig, x: jax.Array, dead_mask: jax.Array
) -> tuple[jax.Array, dict]:
    """FVU + aux_coef * AuxK. x [B, D] (already input-scaled), dead_mask [N] bool.

    AuxK (Gao et al.): the k_aux largest *dead* latents reconstruct the main error
    e = x - x_hat (held fixed), normalised like FVU, so dead latents get a gradient that
    pulls them toward what the live ones miss. Zero when no latent is dead.
    """
    acts, ids, aux_acts, aux_ids = _encode_with_aux(params, config, x, dead_mask)
    x_hat = decode(params, acts, ids)  # [B, D]
    fvu = fraction_of_variance_unexplained(x, x_hat)

    error = jax.lax.stop_gradient(x - x_hat)  # [B, D]

    def aux_fvu(decoder_w, aux_acts):
        error_hat = sparse_decode(aux_acts, aux_ids, decoder_w)  # [B, D]
        return jnp.sum(jnp.square(error - error_hat)) / jnp.maximum(
            jnp.sum(jnp.square(error - error.mean(0, keepdims=True))), 1e-12
        )

    # The [B, k_aux, D] gather (k_aux = D/2 is 9x k at d=576) runs only when a latent is dead.
    aux_loss = jax.lax.cond(
        jnp.any(dead_mask), aux_fvu, lambda *_: jnp.zeros((), x.dtype), params.decoder_w, aux_acts
    )
    loss = fvu + config.aux_coef * aux_loss
    stats = {
        "fvu": fvu,
        "aux_loss": aux_loss,
        "l0": jnp.mean(jnp.sum(acts > 0, axis=-1).astype(jnp.float32)),
        "acts": acts,
        "ids": ids,
    }
    return loss, stats


def remove_parallel_grad(decoder_grad: jax.Array, decoder_w: jax.Array) -> jax.Array:
    """Drop the gradient component along each (unit) decoder row. # [N, D] -> [N, D]

    A step along the row would only change its norm, which the renormalisation after the
    step undoes; removing it first keeps Adam's moments about useful directions (Gao et al.).
    """
    parallel = jnp.sum(decoder_grad * decoder_w, axis=-1, keepdims=True)  # [N, 1]
    return decoder_grad - parallel * decoder_w


def fold_input_scale(params: SAEParams, input_scale: float) -> SAEParams:
    """SAE trained on s*x -> identical SAE on raw x (same decoder directions).

    TopK and ReLU commute with a positive scale, so with z' = z / s:
    z' = TopK(W_enc (x - b_dec/s) + b_enc/s) and x_hat_raw = W_dec^T z' + b_dec/s.
    Latent activations come out in raw-residual units.
    """
    scale = jnp.asarray(input_scale, jnp.float32)
    return params.replace(
        encoder_b=params.encoder_b / scale, decoder_b=params.decoder_b / scale
    )
