"""XLA:CPU-tuned kernels shared by the models: custom-VJP layers, the LSTM loop, fused dropout.

Each is a plain function of arrays (or a small `nn.Module` around one) that computes what its
textbook form computes, bit for bit or to float rounding (tests compare them), and is shaped so
that XLA's CPU backend runs it near the matmul peak:

- `affine` / `FusedBiasDense`: x·W + b whose backward pass takes ∂W and ∂b in one product from
  a stored [xᵀ; 1];
- `lstm_scan` / `lstm_step`: an LSTM over precomputed input projections, with a hand-written
  backward pass (one recurrent weight-gradient matmul after the loop);
- `gru_scan`: the same for a GRU whose rows stop at their own lengths (the dialog CVAE's);
- `threefry2x32` / `dropout`: dropout masks from Threefry-2x32 written as fusible integer ops,
  the same bits as ``jax.random.bernoulli``.

`implementation(name)` returns the set a model uses: ``"cpu"`` (the above) or ``"plain"``
(textbook `jnp` code differentiated by `jax.grad`, ``jax.random.bernoulli`` masks: what XLA's
GPU and TPU backends are tuned for, and any PRNG implementation); ``"auto"`` picks ``cpu`` on
the CPU backend and ``plain`` elsewhere. Both give the same parameters, values and gradients
(to float rounding; tested), so a checkpoint moves between them.

Nothing here knows about VAEs; every model module may use these.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

DTYPES = ("float32", "bfloat16")


def dot(a: jnp.ndarray, b: jnp.ndarray, dtype: str = "float32") -> jnp.ndarray:
    """a (…, K) @ b (K, N) with the operands in ``dtype`` (``bfloat16``: mixed precision) and
    the product accumulated and returned in float32; the plain ``a @ b`` for float32."""
    if dtype == "float32":
        return a @ b
    contract = (((a.ndim - 1,), (0,)), ((), ()))
    # The operands are already rounded: DEFAULT whatever config.matmul_precision says, so
    # "highest" never asks a GPU or TPU for a multi-pass bfloat16 product.
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), contract, precision=jax.lax.Precision.DEFAULT,
        preferred_element_type=jnp.float32,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def affine(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray, dtype: str = "float32") -> jnp.ndarray:
    """x @ w + b for x (N, D), w (D, M), b (M,), whose backward pass keeps [xᵀ; 1].

    ∂w = xᵀ·g contracts the rows of both x and g. XLA's CPU backend computes that product by
    transposing g, which for the output layer is the (N, V) logits gradient, a fifth of a
    PTB-size step; from a stored xᵀ (N × D, small) it is a plain matmul, and a row of ones
    under it gives ∂b = Σ_n g_n in the same product instead of another pass over g. The
    optimisation barrier keeps XLA from folding the transpose back into the product. Like every
    custom VJP here (`lstm_scan` too), it supports reverse mode to any order (SA-VAE
    differentiates through gradients) but not forward mode (`jax.jvp`). ``dtype``: the
    matmuls' operand type (`dot`), forward and backward.
    """
    return dot(x, w, dtype) + b


def _affine_fwd(x, w, b, dtype):
    x_t1 = jnp.concatenate([x.T, jnp.ones((1, x.shape[0]), x.dtype)]).astype(dtype)
    return dot(x, w, dtype) + b, (jax.lax.optimization_barrier(x_t1), w)


def _affine_bwd(dtype, residuals, g):
    x_t1, w = residuals
    d_x = dot(g, w.T, dtype)
    # A zero-weighted data dependency: ∂w waits for ∂x, so the layers below (the decoder's
    # backward loop, latency-bound) start at once and run beside ∂w's large product instead of
    # after it (XLA orders independent products as it likes). Exact: x + 0·d = x for finite d,
    # and a non-finite ∂x makes the whole gradient non-finite, a step the train step skips.
    x_t1 = x_t1 + (0.0 * d_x[0, 0]).astype(x_t1.dtype)
    d_wb = dot(x_t1, g, dtype)
    return d_x, d_wb[:-1], d_wb[-1]


affine.defvjp(_affine_fwd, _affine_bwd)


def batched_affine(
    x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray, dtype: str = "float32"
) -> jnp.ndarray:
    """x (…, D) @ w (D, M) + b through `affine`, the leading axes flattened into rows."""
    rows = affine(x.reshape(-1, x.shape[-1]), w, b, dtype)
    return rows.reshape(*x.shape[:-1], w.shape[-1])


def plain_affine(
    x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray, dtype: str = "float32"
) -> jnp.ndarray:
    """x (…, D) @ w (D, M) + b, differentiated by JAX."""
    return dot(x, w, dtype) + b


class FusedBiasDense(nn.Module):
    """`nn.Dense` (same parameters: ``kernel`` (D, M), ``bias`` (M,)) computed by `affine`
    (``fused``; else `plain_affine`).

    ``nn.Dense`` adds its bias outside ``dot_general``, where the bias gradient cannot join the
    kernel gradient's matmul.
    """

    features: int
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer
    fused: bool = True
    dtype: str = "float32"  # the matmul's operands (`dot`); parameters stay float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        return (batched_affine if self.fused else plain_affine)(x, kernel, bias, self.dtype)


class PatchConv(nn.Module):
    """`nn.Conv` over one axis with VALID padding (same parameters: ``kernel`` (W, C, F),
    ``bias`` (F,)) computed as one matmul: the L' = ⌊(L − W)/s⌋ + 1 windows of x (…, L, C) laid
    side by side as rows (…, L', W·C), times the kernel as (W·C, F),

        y[…, i, :] = Σ_{j<W} x[…, s·i + j, :] · kernel[j] + bias.

    The same sums as ``nn.Conv``. On XLA's CPU backend its strided convolutions and their
    gradients run far below the matmul rate: this form made the Yelp train step 1.68× faster
    (`benchmarks/results/yelp_cnn_ab.json`). ``dtype``: the matmul's operands (`dot`).
    """

    features: int
    width: int
    stride: int
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (self.width, channels, self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        out = (x.shape[-2] - self.width) // self.stride + 1
        if out < 1:
            raise ValueError(f"PatchConv: {x.shape[-2]} positions, fewer than {self.width}.")
        start = [self.stride * i for i in range(out)]
        windows = jnp.stack([x[..., i : i + self.width, :] for i in start], axis=-3)
        rows = windows.reshape(*x.shape[:-2], out, self.width * channels)
        return dot(rows, kernel.reshape(self.width * channels, self.features), self.dtype) + bias


def _cell(gates: jnp.ndarray, c: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The LSTM cell from its pre-activations (i, f, g, o): h_t, c_t and the activated gates."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c + i * g
    return o * jnp.tanh(c), c, jnp.concatenate([i, f, g, o], axis=-1)


def _lstm_forward(input_gates, w_hh, h0, c0, dtype="float32"):
    """The scan of `lstm_scan`, time-major, also returning c_t and the activated gates."""
    w_hh = w_hh.astype(dtype)  # once, not every step

    def cell(carry, x_t):
        h, c = carry
        h, c, acts = _cell(x_t + dot(h, w_hh, dtype), c)
        return (h, c), (h, c, acts)

    _, (hs, cs, acts) = jax.lax.scan(cell, (h0, c0), jnp.swapaxes(input_gates, 0, 1))
    return hs, cs, acts


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_scan(
    input_gates: jnp.ndarray,
    w_hh: jnp.ndarray,
    h0: jnp.ndarray,
    c0: jnp.ndarray,
    dtype: str = "float32",
) -> jnp.ndarray:
    """Runs an LSTM whose input projection W_x·x_t + b is already computed for every step.

    input_gates: (B, T, 4H) in gate order (i, f, g, o); w_hh: (H, 4H). Returns h_t, (B, T, H):
        i, f, g, o = W_x x_t + b + W_h h_{t−1}
        c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g),   h_t = σ(o) ⊙ tanh(c_t)
    Only the recurrent matmul stays inside the scan; the input projection is one large matmul
    outside it. The backward pass is written out (backpropagation through time): its loop
    carries ∂h and ∂c and emits each step's gate gradient δ_t; ∂W_h = Σ_t h_{t−1}ᵀ δ_t is then
    one (H × BT)·(BT × 4H) matmul after the loop instead of T small ones inside it. ``dtype``:
    the matmuls' operand type (`dot`); the cell's elementwise math stays float32.
    """
    return jnp.swapaxes(_lstm_forward(input_gates, w_hh, h0, c0, dtype)[0], 0, 1)


def _lstm_scan_fwd(input_gates, w_hh, h0, c0, dtype):
    hs, cs, acts = _lstm_forward(input_gates, w_hh, h0, c0, dtype)
    return jnp.swapaxes(hs, 0, 1), (hs, cs, acts, w_hh, h0, c0)


def _lstm_scan_bwd(dtype, residuals, d_hs):
    hs, cs, acts, w_hh, h0, c0 = residuals  # time-major
    c_prev = jnp.concatenate([c0[None], cs[:-1]])
    # W_hᵀ materialised once: the loop's δ·W_hᵀ then reads its operand in order (on one core,
    # 192 instead of 246 µs a step at the PTB size).
    w_hh_t = jax.lax.optimization_barrier(w_hh.T.astype(dtype))

    def cell(carry, xs):
        dh_next, dc_next = carry
        d_out, c, c_before, act = xs
        i, f, g, o = jnp.split(act, 4, axis=-1)
        dh = d_out + dh_next
        tanh_c = jnp.tanh(c)
        dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
        delta = jnp.concatenate(
            [
                dc * g * i * (1.0 - i),
                dc * c_before * f * (1.0 - f),
                dc * i * (1.0 - g * g),
                dh * tanh_c * o * (1.0 - o),
            ],
            axis=-1,
        )
        return (dot(delta, w_hh_t, dtype), dc * f), delta

    (dh0, dc0), deltas = jax.lax.scan(
        cell, (jnp.zeros_like(h0), jnp.zeros_like(c0)),
        (jnp.swapaxes(d_hs, 0, 1), cs, c_prev, acts), reverse=True,
    )  # fmt: skip
    h_prev = jnp.concatenate([h0[None], hs[:-1]]).reshape(-1, hs.shape[-1])
    # h_prevᵀ materialised (small) so that XLA's CPU backend does not transpose δ instead.
    h_prev_t = jax.lax.optimization_barrier(h_prev.T.astype(dtype))
    d_w_hh = dot(h_prev_t, deltas.reshape(-1, deltas.shape[-1]), dtype)
    return jnp.swapaxes(deltas, 0, 1), d_w_hh, dh0, dc0


lstm_scan.defvjp(_lstm_scan_fwd, _lstm_scan_bwd)


def plain_lstm_scan(
    input_gates: jnp.ndarray,
    w_hh: jnp.ndarray,
    h0: jnp.ndarray,
    c0: jnp.ndarray,
    dtype: str = "float32",
) -> jnp.ndarray:
    """`lstm_scan` as a plain `jax.lax.scan`, its backward pass left to JAX."""
    return jnp.swapaxes(_lstm_forward(input_gates, w_hh, h0, c0, dtype)[0], 0, 1)


def lstm_step(
    input_gates: jnp.ndarray,
    w_hh: jnp.ndarray,
    h: jnp.ndarray,
    c: jnp.ndarray,
    dtype: str = "float32",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One step of the cell of `lstm_scan` (the same `_cell`): (h_t, c_t)."""
    h, c, _ = _cell(input_gates + dot(h, w_hh, dtype), c)
    return h, c


def _gru_forward(gates_x, w_h, b_h, h0, lengths, dtype="float32"):
    """The scan of `gru_scan`, time-major; also returns what its backward pass needs."""
    hidden = h0.shape[-1]
    w_h = w_h.astype(dtype)  # once, not every step
    alive = jnp.arange(gates_x.shape[1])[:, None] < lengths[None, :]  # (T, B)

    def cell(h, xs):
        gx, a = xs
        gh = dot(h, w_h, dtype) + b_h
        r = jax.nn.sigmoid(gx[:, :hidden] + gh[:, :hidden])
        u = jax.nn.sigmoid(gx[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
        gh_n = gh[:, 2 * hidden :]
        n = jnp.tanh(gx[:, 2 * hidden :] + r * gh_n)
        h_new = jnp.where(a[:, None], (1.0 - u) * n + u * h, h)
        return h_new, (h_new, r, u, n, gh_n)

    last, (hs, r, u, n, gh_n) = jax.lax.scan(cell, h0, (jnp.swapaxes(gates_x, 0, 1), alive))
    return last, hs, (r, u, n, gh_n, alive)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gru_scan(
    gates_x: jnp.ndarray,
    w_h: jnp.ndarray,
    b_h: jnp.ndarray,
    h0: jnp.ndarray,
    lengths: jnp.ndarray,
    dtype: str = "float32",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """A GRU (the cuDNN/PyTorch variant) over precomputed input gates ``gates_x`` = x·W_x + b_x,
    (B, T, 3H) in the order (reset, update, candidate); w_h (H, 3H), b_h (3H,):

        r, u = σ(gx_r + h·W_hr + b_hr), σ(gx_u + h·W_hu + b_hu)
        n = tanh(gx_n + r ⊙ (h·W_hn + b_hn)),   h' = (1 − u) ⊙ n + u ⊙ h

    Row b stops at step ``lengths[b]``: its state is held from there on. Returns the states
    (B, T, H) and the last ones (B, H). As `lstm_scan`, only the recurrent matmul is inside
    the loop, and the backward pass is written out: its loop carries ∂h and emits each step's
    input-gate gradient δ_t; ∂W_h and ∂b_h = Σ_t [h_{t−1}; 1]ᵀ δ'_t (δ' the recurrent gates'
    gradient, δ with its candidate part scaled by r) are one matmul after the loop.
    """
    last, hs, _ = _gru_forward(gates_x, w_h, b_h, h0, lengths, dtype)
    return jnp.swapaxes(hs, 0, 1), last


def _gru_scan_fwd(gates_x, w_h, b_h, h0, lengths, dtype):
    last, hs, saved = _gru_forward(gates_x, w_h, b_h, h0, lengths, dtype)
    return (jnp.swapaxes(hs, 0, 1), last), (hs, saved, w_h, h0, lengths)


def _gru_scan_bwd(dtype, residuals, cotangents):
    hs, (r, u, n, gh_n, alive), w_h, h0, lengths = residuals  # time-major
    d_hs, d_last = cotangents
    hidden = h0.shape[-1]
    h_prev = jnp.concatenate([h0[None], hs[:-1]])
    w_h_t = jax.lax.optimization_barrier(w_h.T.astype(dtype))  # read in order by the loop

    def cell(dh_next, xs):
        d_out, h_before, r, u, n, gh_n, a = xs
        dh = d_out + dh_next
        d_n = dh * (1.0 - u) * (1.0 - n * n)
        d_u = dh * (h_before - n) * u * (1.0 - u)
        d_r = d_n * gh_n * r * (1.0 - r)
        a = a[:, None]
        d_gx = jnp.where(a, jnp.concatenate([d_r, d_u, d_n], axis=-1), 0.0)
        d_gh = jnp.concatenate([d_gx[:, : 2 * hidden], d_gx[:, 2 * hidden :] * r], axis=-1)
        # A held (finished) row passes its gradient on unchanged.
        return jnp.where(a, dh * u + dot(d_gh, w_h_t, dtype), dh), d_gx

    dh0, d_gx = jax.lax.scan(
        cell, d_last, (jnp.swapaxes(d_hs, 0, 1), h_prev, r, u, n, gh_n, alive), reverse=True
    )
    d_gh = jnp.concatenate([d_gx[..., : 2 * hidden], d_gx[..., 2 * hidden :] * r], axis=-1)
    d_gh = d_gh.reshape(-1, d_gh.shape[-1])
    # [h_prevᵀ; 1] materialised (small), so that XLA's CPU backend does not transpose δ'
    # instead, and the bias gradient joins the weight gradient's product.
    rows = h_prev.reshape(-1, hidden)
    h_prev_t1 = jnp.concatenate([rows.T, jnp.ones((1, rows.shape[0]), rows.dtype)])
    d_wb = dot(jax.lax.optimization_barrier(h_prev_t1.astype(dtype)), d_gh, dtype)
    return jnp.swapaxes(d_gx, 0, 1), d_wb[:-1], d_wb[-1], dh0, None


gru_scan.defvjp(_gru_scan_fwd, _gru_scan_bwd)


def plain_gru_scan(
    gates_x: jnp.ndarray,
    w_h: jnp.ndarray,
    b_h: jnp.ndarray,
    h0: jnp.ndarray,
    lengths: jnp.ndarray,
    dtype: str = "float32",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`gru_scan` as a plain `jax.lax.scan`, its backward pass left to JAX."""
    last, hs, _ = _gru_forward(gates_x, w_h, b_h, h0, lengths, dtype)
    return jnp.swapaxes(hs, 0, 1), last


# Rotations of Threefry-2x32 (Salmon et al. 2011, Table 4), rounds 1–4 and 5–8 of each 8.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(
    key: jnp.ndarray, x0: jnp.ndarray, x1: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Threefry-2x32, 20 rounds (Salmon et al. 2011): the block cipher behind `jax.random`.

    key: (..., 2) uint32; the counter words x0, x1 (uint32) broadcast against ``key[..., 0]``.
    The same function as ``jax.extend.random.threefry_2x32`` (a test compares them), written
    as plain integer operations so that XLA fuses it into the kernel that uses the bits; JAX's
    own CPU lowering is a loop over the five 4-round blocks, each iteration a few kernels over
    the whole array, which for a PTB batch's dropout masks cost ≈ 2 ms between the encoder
    and the decoder.
    """
    k0, k1 = key[..., 0], key[..., 1]
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for block in range(5):
        for r in _THREEFRY_ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r)))
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + jnp.uint32(block + 1)
    return x0, x1


def _raw_threefry_keys(keys: jnp.ndarray) -> jnp.ndarray:
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    if keys.dtype != jnp.uint32 or keys.shape[-1:] != (2,):
        raise ValueError(
            f"dropout keys: expected threefry keys, uint32 of shape (..., 2), got {keys.dtype} "
            f"{keys.shape} (another jax_default_prng_impl?)"
        )
    return keys


def plain_dropout(x: jnp.ndarray, rate: float, keys: jnp.ndarray | None) -> jnp.ndarray:
    """`dropout` from ``jax.random.bernoulli(fold_in(keys[b], t), 1 − rate, (D,))``: the same
    masks for threefry keys, and any other PRNG implementation's keys (e.g. ``rbg``)."""
    if keys is None or rate == 0.0:
        return x
    steps, dims = x.shape[1], x.shape[2]

    def masks(key):
        step_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(steps))
        return jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, (dims,)))(step_keys)

    keep = jax.vmap(masks)(keys)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _is_threefry(keys: jnp.ndarray) -> bool:
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return "threefry" in str(jax.random.key_impl(keys))
    return keys.dtype == jnp.uint32 and keys.shape[-1:] == (2,)


def dropout(x: jnp.ndarray, rate: float, keys: jnp.ndarray | None) -> jnp.ndarray:
    """Inverted dropout on (B, T, D) with one key per example; identity if keys is None.

    Element (t, d) of example b is kept with probability 1 − rate, exactly where
    ``jax.random.bernoulli(jax.random.fold_in(keys[b], t), 1 − rate, (D,))[d]`` is true (the
    same bits, from `threefry2x32`; a test checks it). Step t's mask depends on t alone, not
    on how far the row is padded: bucket padding leaves training with dropout unchanged. Keys
    of another PRNG implementation (``JAX_DEFAULT_PRNG_IMPL=rbg``) take `plain_dropout`.
    """
    if keys is None or rate == 0.0:
        return x
    if not _is_threefry(keys):
        return plain_dropout(x, rate, keys)
    keys = _raw_threefry_keys(keys)
    _, steps, dims = x.shape
    zero = jnp.uint32(0)
    step_keys = jnp.stack(  # fold_in(key, t): the cipher of the counter (0, t)
        threefry2x32(keys[:, None, :], zero, jnp.arange(steps, dtype=jnp.uint32)), axis=-1
    )
    # random_bits(step_key, 32, (D,)): the cipher of (0, d), its two words xor-ed.
    bits = jnp.bitwise_xor(
        *threefry2x32(step_keys[:, :, None, :], zero, jnp.arange(dims, dtype=jnp.uint32))
    )
    # uniform in [0, 1) from the top 23 bits, as jax.random.uniform builds it.
    mantissa = (bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
    return jnp.where(uniform < jnp.float32(1.0 - rate), x / (1.0 - rate), 0.0)


class Kernels(NamedTuple):
    """The layers a model is built from; `implementation` gives the CPU-tuned or plain set,
    each with its matmuls' operand type bound (``dtype``)."""

    fused_dense: bool
    dtype: str
    affine: Callable
    lstm_scan: Callable
    lstm_step: Callable
    dropout: Callable
    gru_scan: Callable


KERNELS = ("auto", "cpu", "plain")


def resolve(name: str) -> str:
    """The set ``name`` stands for on this backend: ``auto`` is ``cpu`` on the CPU, else
    ``plain``; other names are returned as they are."""
    if name == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "plain"
    return name


def implementation(name: str, dtype: str = "float32") -> Kernels:
    """``cpu``: the custom-VJP kernels above; ``plain``: `plain_affine`, `plain_lstm_scan`,
    `plain_dropout`; ``auto``: ``cpu`` on the CPU backend, ``plain`` elsewhere. ``dtype``: the
    matmuls' operands (``float32``, or ``bfloat16`` with float32 accumulation)."""
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={dtype!r}: must be one of {DTYPES}.")
    name = resolve(name)
    step = functools.partial(lstm_step, dtype=dtype)
    if name == "cpu":
        return Kernels(
            True, dtype, functools.partial(batched_affine, dtype=dtype),
            lambda *a: lstm_scan(*a, dtype), step, dropout,
            lambda *a: gru_scan(*a, dtype),
        )  # fmt: skip
    if name == "plain":
        return Kernels(
            False, dtype, functools.partial(plain_affine, dtype=dtype),
            functools.partial(plain_lstm_scan, dtype=dtype), step, plain_dropout,
            functools.partial(plain_gru_scan, dtype=dtype),
        )  # fmt: skip
    raise ValueError(f"config.model.kernels={name!r}: must be one of {KERNELS}.")
