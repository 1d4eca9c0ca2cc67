"""The LSTM VAE of the paper's language-model code (SA-VAE lineage, Kim et al. 2018).

    q(z|x) = N(μ(x), diag σ²(x)):  embed x → LSTM → h at the last true token → Dense μ, log σ²
    p(x|z) = Π_t p(x_t | x_<t, z): [embed(x_<t); z] → LSTM with h₀ = Dense(z), c₀ = 0
                                    → Dense to the vocabulary

Token layout (`vae_jax.core.tokens`): a sequence is ``<s> w₁ … w_n </s>`` followed by ``<pad>``. The
encoder reads all of it up to ``</s>``; the decoder reads ``<s> w₁ … w_n`` and predicts
``w₁ … w_n </s>``. The layers are `vae_jax.core.kernels`' (``kernels``: CPU-tuned custom VJPs, or
plain code for GPU/TPU; a test checks the model against a plain formulation).

Noise is per example: every stochastic method takes ``keys``, one PRNG key per example (shape
``(B, 2)``), so an example's z sample and dropout masks do not depend on which other examples
share its batch or device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from vae_jax.core import kernels
from vae_jax.core.kernels import FusedBiasDense
from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID, sequence_lengths


def uniform_init(scale: float) -> nn.initializers.Initializer:
    """U(−scale, scale), the reference code's initialisation of every parameter."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


# The fields of the layers' implementation and of the encoder's kind, which every config
# carries (`options`); their meaning is documented on `VAE`.
OPTION_FIELDS = (
    "kernels", "dtype", "encoder", "cnn_filters", "cnn_width", "cnn_stride", "cnn_length",
    "deterministic", "embedding",
)  # fmt: skip


class VAE(nn.Module):
    """LSTM VAE. Sizes follow the reference code's field names; every one is a config field."""

    vocab_size: int
    enc_emb_dim: int = 256
    enc_hidden_dim: int = 256
    dec_emb_dim: int = 256
    dec_hidden_dim: int = 256
    latent_dim: int = 32
    dec_dropout_in: float = 0.5
    dec_dropout_out: float = 0.5
    init_scale: float = 0.1
    # BN-VAE (Zhu et al. 2020): μ = γ·(μ̂ − E_B[μ̂]) / √(Var_B[μ̂] + ε) + b with a fixed γ
    # (> 0 turns it on) and a learned shift b, so that E_x[KL] ≥ D·γ²/2: the KL cannot vanish.
    # Batch statistics over the real rows of the global batch in training (``bn_axis_name``:
    # the device axis, set by the train step), running averages (momentum ``bn_momentum``) at
    # evaluation, kept as parameters the optimizer never moves (their gradient is 0).
    bn_gamma: float = 0.0
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    # The layers' implementation (`vae_jax.core.kernels.implementation`): "cpu" (custom VJPs tuned
    # for XLA:CPU), "plain" (jax.grad of plain code: GPU/TPU), "auto" (by backend).
    kernels: str = "auto"
    # The large matmuls' operands (`kernels.dot`): "float32", or "bfloat16" (mixed precision:
    # float32 parameters, accumulation, LSTM cell and softmax).
    dtype: str = "float32"
    # The encoder: "lstm" (above), or "cnn" (Fu et al.'s Yelp code, after Zhang et al. 2017):
    # the row w₁ … w_n </s> at offset width − 1 in a fixed window of cnn_length + 2(width − 1)
    # positions, then len(cnn_filters) VALID convolutions of width cnn_width, the first ones
    # with stride cnn_stride and ReLU, the last spanning what is left (to length 1) with tanh.
    encoder: str = "lstm"
    cnn_filters: tuple[int, ...] = (300, 600, 900)
    cnn_width: int = 5
    cnn_stride: int = 2
    cnn_length: int = 17  # the longest w₁ … w_n </s> the window holds
    # A deterministic encoder (an autoencoder's): z = μ, no sampling (train with β = 0).
    deterministic: bool = False
    # "separate": the encoder and the decoder embed with tables of their own, the output layer
    # is a Dense. "shared_normalized" (Fu et al.'s Yelp code): one table E, used row-normalised
    # (Ê = E / ‖E‖_row) by the encoder and the decoder, and logits = h·(W Êᵀ) + b with a
    # learned W (dec_hidden_dim × emb): the output layer tied to the embedding.
    embedding: str = "separate"

    def setup(self):
        init = uniform_init(self.init_scale)
        self.k = kernels.implementation(self.kernels, self.dtype)

        def dense(features: int, name: str, dtype: str = self.dtype) -> FusedBiasDense:
            return FusedBiasDense(
                features, kernel_init=init, bias_init=init, fused=self.k.fused_dense,
                dtype=dtype, name=name,
            )  # fmt: skip

        h_enc, h_dec = self.enc_hidden_dim, self.dec_hidden_dim
        if self.embedding == "shared_normalized":
            self.embed_table = self.param("embed", init, (self.vocab_size, self.dec_emb_dim))
        else:
            self.enc_embed = nn.Embed(self.vocab_size, self.enc_emb_dim, embedding_init=init)
        if self.encoder == "cnn":
            self.enc_conv = [
                kernels.PatchConv(
                    features,
                    width,
                    stride,
                    kernel_init=init,
                    bias_init=init,
                    dtype=self.dtype,
                    name=f"enc_conv_{i}",
                )
                for i, (features, width, stride) in enumerate(self._cnn_layers())
            ]
            h_enc = self.cnn_filters[-1]
        else:
            self.enc_input = dense(4 * h_enc, "enc_input")
            self.enc_w_hh = self.param("enc_w_hh", init, (h_enc, 4 * h_enc))
        # The latent heads stay float32: small products, and the posterior's precision.
        self.enc_logvar = dense(self.latent_dim, "enc_logvar", "float32")
        if self.bn_gamma <= 0:
            self.enc_mu = dense(self.latent_dim, "enc_mu", "float32")
        else:
            # No bias before the normalisation: it would have no effect, its gradient being
            # float noise that Adam's 1/√v turns into steps of size lr.
            self.enc_mu_kernel = self.param("enc_mu_kernel", init, (h_enc, self.latent_dim))
            zeros, ones = nn.initializers.zeros, nn.initializers.ones
            self.enc_mu_bn_shift = self.param("enc_mu_bn_shift", zeros, (self.latent_dim,))
            self.enc_mu_bn_mean = self.param("enc_mu_bn_mean", zeros, (self.latent_dim,))
            self.enc_mu_bn_var = self.param("enc_mu_bn_var", ones, (self.latent_dim,))

        if self.embedding != "shared_normalized":
            self.dec_embed = nn.Embed(self.vocab_size, self.dec_emb_dim, embedding_init=init)
        # One input kernel over the concatenation [embedding; z], split in two so that z's
        # share is computed once per sequence instead of once per step.
        self.dec_w_in = self.param(
            "dec_w_in", init, (self.dec_emb_dim + self.latent_dim, 4 * h_dec)
        )
        self.dec_b_in = self.param("dec_b_in", init, (4 * h_dec,))
        self.dec_w_hh = self.param("dec_w_hh", init, (h_dec, 4 * h_dec))
        self.dec_h0 = dense(h_dec, "dec_h0", "float32")
        if self.embedding == "shared_normalized":
            self.dec_output_map = self.param("dec_output_map", init, (h_dec, self.dec_emb_dim))
            self.dec_output_bias = self.param("dec_output_bias", init, (self.vocab_size,))
        else:
            self.dec_output = dense(self.vocab_size, "dec_output")

    def _normalized_table(self) -> jnp.ndarray:
        table = self.embed_table
        return table / jnp.linalg.norm(table, axis=-1, keepdims=True)

    def embed_enc(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """The encoder's input embeddings of ``tokens``."""
        if self.embedding == "shared_normalized":
            return jnp.take(self._normalized_table(), tokens, axis=0)
        return self.enc_embed(tokens)

    def embed_dec(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """The decoder's input embeddings of ``tokens``."""
        if self.embedding == "shared_normalized":
            return jnp.take(self._normalized_table(), tokens, axis=0)
        return self.dec_embed(tokens)

    def output_logits(self, h: jnp.ndarray) -> jnp.ndarray:
        """Logits over the vocabulary from decoder states h (…, dec_hidden_dim)."""
        if self.embedding == "shared_normalized":
            tied = self.dec_output_map @ self._normalized_table().T  # (H, V)
            return self.k.affine(h, tied, self.dec_output_bias)
        return self.dec_output(h)

    def _cnn_layers(self) -> list[tuple[int, int, int]]:
        """(filters, width, stride) of each convolution; the last one's width is what is left
        of the window after the others (VALID), so that it ends at length 1."""
        length = self.cnn_length + 2 * (self.cnn_width - 1)
        layers = []
        for features in self.cnn_filters[:-1]:
            layers.append((features, self.cnn_width, self.cnn_stride))
            length = (length - self.cnn_width) // self.cnn_stride + 1
        if length < 1:
            raise ValueError(
                f"config.model.cnn_*: a window of {self.cnn_length} tokens is too short for "
                f"{len(self.cnn_filters)} convolutions of width {self.cnn_width}, stride "
                f"{self.cnn_stride}."
            )
        return [*layers, (self.cnn_filters[-1], length, 1)]

    def cnn_features(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """The CNN encoder's (B, cnn_filters[-1]) features of rows ``<s> w … </s> <pad>…``.

        Rows longer than ``cnn_length`` tokens after ``<s>`` are refused at trace time only
        through their shape: the data's ``max_length`` must keep them within the window."""
        body = tokens[:, 1:]  # w₁ … w_n </s> <pad> …
        if body.shape[1] > self.cnn_length:
            # Bucket padding beyond the window is all <pad>: sentences are shorter (the data's
            # max_length keeps them so); cut it.
            body = body[:, : self.cnn_length]
        pad = self.cnn_width - 1
        window = jnp.pad(
            body, ((0, 0), (pad, pad + self.cnn_length - body.shape[1])), constant_values=PAD_ID
        )
        x = self.embed_enc(window)
        for i, conv in enumerate(self.enc_conv):
            x = conv(x)
            x = jnp.tanh(x) if i == len(self.enc_conv) - 1 else jax.nn.relu(x)
        return x[:, 0]

    def encode(self, tokens: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """μ and log σ² of q(z|x), each (B, latent_dim), from the hidden state at ``</s>``
        (``train``: a BN-VAE's μ from batch statistics, else from its running ones)."""
        return self.encode_with_stats(tokens, train)[:2]

    def encode_with_stats(
        self, tokens: jnp.ndarray, train: bool = False
    ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray]]:
        """`encode`, plus a BN-VAE's batch statistics of μ̂ in training (else ``{}``)."""
        batch = tokens.shape[0]
        if self.encoder == "cnn":
            h_last = self.cnn_features(tokens)
        else:
            gates = self.enc_input(self.embed_enc(tokens))
            zeros = jnp.zeros((batch, self.enc_hidden_dim), gates.dtype)
            hs = self.k.lstm_scan(gates, self.enc_w_hh, zeros, zeros)
            # Padding comes after the last true token: the state there has not seen any of it.
            last = jnp.maximum(sequence_lengths(tokens) - 1, 0)
            h_last = hs[jnp.arange(batch), last]
        logvar = self.enc_logvar(h_last)
        if self.bn_gamma <= 0:
            return self.enc_mu(h_last), logvar, {}
        mu = h_last @ self.enc_mu_kernel
        stats = {}
        if train:
            real = (sequence_lengths(tokens) > 0)[:, None]

            def batch_sum(x):  # over the real rows of the global batch
                x = jnp.sum(jnp.where(real, x, 0.0), 0)
                return x if self.bn_axis_name is None else jax.lax.psum(x, self.bn_axis_name)

            count = jnp.maximum(batch_sum(jnp.ones_like(mu)), 1.0)
            mean = batch_sum(mu) / count
            var = batch_sum(jnp.square(mu - mean)) / count  # two passes: no cancellation
            stats = {"mean": mean, "var": var}
        else:
            mean = jax.lax.stop_gradient(self.enc_mu_bn_mean)
            var = jax.lax.stop_gradient(self.enc_mu_bn_var)
        mu = self.bn_gamma * (mu - mean) / jnp.sqrt(var + 1e-5) + self.enc_mu_bn_shift
        return mu, logvar, stats

    def updated_bn_stats(self, params: dict, stats: dict[str, jnp.ndarray]) -> dict:
        """``params`` with a BN-VAE's running statistics moved toward the batch's ``stats``:
        r ← m·r + (1 − m)·s; unchanged without BN."""
        if self.bn_gamma <= 0 or not stats:
            return params
        m = self.bn_momentum
        return {
            **params,
            "enc_mu_bn_mean": m * params["enc_mu_bn_mean"] + (1 - m) * stats["mean"],
            "enc_mu_bn_var": m * params["enc_mu_bn_var"] + (1 - m) * stats["var"],
        }

    def sample(self, mu: jnp.ndarray, logvar: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
        """Reparameterised z = μ + σ ⊙ ε, ε ~ N(0, I) drawn from each example's key (μ itself
        for a ``deterministic`` encoder)."""
        if self.deterministic:
            return mu
        eps = jax.vmap(lambda k: jax.random.normal(k, mu.shape[1:], mu.dtype))(keys)
        return mu + jnp.exp(0.5 * logvar) * eps

    def decode(
        self, tokens: jnp.ndarray, z: jnp.ndarray, dropout_keys: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """Teacher-forced logits (B, T − 1, V) for the targets ``tokens[:, 1:]``.

        Dropout is applied to the input embeddings and to the LSTM outputs when
        ``dropout_keys`` (one per example) is given; ``None`` means deterministic.
        """
        keys_in = keys_out = None
        if dropout_keys is not None:
            keys_in = jax.vmap(jax.random.fold_in, (0, None))(dropout_keys, 0)
            keys_out = jax.vmap(jax.random.fold_in, (0, None))(dropout_keys, 1)
        emb = self.k.dropout(self.embed_dec(tokens[:, :-1]), self.dec_dropout_in, keys_in)
        w_emb, w_z = jnp.split(self.dec_w_in, [self.dec_emb_dim])
        gates = self.k.affine(emb, w_emb, self.dec_b_in) + (z @ w_z)[:, None, :]
        h0 = self.dec_h0(z)
        hs = self.k.lstm_scan(gates, self.dec_w_hh, h0, jnp.zeros_like(h0))
        return self.output_logits(self.k.dropout(hs, self.dec_dropout_out, keys_out))

    def log_likelihood(self, tokens: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
        """log p(x|z) = Σ_t log p(x_t | x_<t, z) of each sentence under each of its k samples.

        tokens: (S, L); z: (S, k, latent_dim). Returns (S, k), no dropout: the same value as
        −`objectives.reconstruction` of `decode` for every z, computed for many z at once (IW
        bounds). The embedding half of the input projection is computed once per sentence and
        shared by its k samples, and the loop stops after the longest row's last target (a
        traced trip count), so softmaxes over bucket padding are never computed.
        """
        targets = tokens[:, 1:]
        w_emb, w_z = jnp.split(self.dec_w_in, [self.dec_emb_dim])
        emb_gates = kernels.dot(self.embed_dec(tokens[:, :-1]), w_emb, self.dtype)  # (S, T, 4H)
        z_gates = z @ w_z + self.dec_b_in  # (S, k, 4H)
        h0 = self.dec_h0(z)
        num_steps = jnp.max(sequence_lengths(tokens)) - 1

        def step(t, carry):
            h, c, total = carry
            gates = z_gates + jax.lax.dynamic_index_in_dim(emb_gates, t, 1)  # (S,1,4H) bcast
            h, c = self.k.lstm_step(gates, self.dec_w_hh, h, c)
            logits = self.output_logits(h)  # (S, k, V)
            target = jax.lax.dynamic_index_in_dim(targets, t, 1, keepdims=False)  # (S,)
            picked = jnp.take_along_axis(
                logits, jnp.broadcast_to(target[:, None, None], (*logits.shape[:2], 1)), -1
            )[..., 0]
            log_p = picked - jax.nn.logsumexp(logits, axis=-1)
            return h, c, total + jnp.where((target != PAD_ID)[:, None], log_p, 0.0)

        init = (h0, jnp.zeros_like(h0), jnp.zeros(z.shape[:2], z.dtype))
        return jax.lax.fori_loop(0, num_steps, step, init)[2]

    def generate(
        self,
        z: jnp.ndarray,
        max_length: int,
        keys: jnp.ndarray | None = None,
        temperature: float = 1.0,
    ) -> jnp.ndarray:
        """Decodes from z (B, latent_dim), starting at ``<s>``, for ``max_length`` steps.

        Greedy (argmax) when ``keys`` is None, else each example samples from
        softmax(logits / temperature) with its own key (``fold_in(key, t)`` at step t);
        ``<pad>`` and ``<s>`` are excluded.
        Returns (B, max_length) ids ``w₁ … w_n </s>`` then ``<pad>``: everything after the
        first ``</s>`` is padding; a row without ``</s>`` was cut at ``max_length``.
        """
        batch = z.shape[0]
        w_emb, w_z = jnp.split(self.dec_w_in, [self.dec_emb_dim])
        z_gates = z @ w_z + self.dec_b_in
        h0 = self.dec_h0(z)

        def step(carry, t):
            h, c, prev, done = carry
            h, c = self.k.lstm_step(
                kernels.dot(self.embed_dec(prev), w_emb, self.dtype) + z_gates, self.dec_w_hh, h, c
            )
            # <pad> and <s> are never targets in training; they are not generated either.
            logits = self.output_logits(h).at[:, jnp.array([PAD_ID, BOS_ID])].set(-jnp.inf)
            if keys is None:
                token = jnp.argmax(logits, axis=-1)
            else:
                step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, t)
                token = jax.vmap(jax.random.categorical)(step_keys, logits / temperature)
            token = jnp.where(done, PAD_ID, token).astype(jnp.int32)
            return (h, c, token, done | (token == EOS_ID)), token

        start = jnp.full((batch,), BOS_ID, jnp.int32)
        init = (h0, jnp.zeros_like(h0), start, jnp.zeros((batch,), bool))
        _, tokens = jax.lax.scan(step, init, jnp.arange(max_length))
        return tokens.T

    def __call__(
        self, tokens: jnp.ndarray, keys: jnp.ndarray, *, train: bool
    ) -> dict[str, jnp.ndarray]:
        """Encodes, samples one z per example and decodes; dropout only when ``train``.

        Returns ``logits`` (B, T − 1, V), ``mu``, ``logvar`` and ``z`` (B, latent_dim), and
        ``bn_stats`` (a BN-VAE's batch statistics in training, else empty).
        """
        z_keys, dropout_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
        mu, logvar, bn_stats = self.encode_with_stats(tokens, train)
        z = self.sample(mu, logvar, z_keys)
        logits = self.decode(tokens, z, dropout_keys if train else None)
        return {"logits": logits, "mu": mu, "logvar": logvar, "z": z, "bn_stats": bn_stats}


def options(**overrides) -> dict:
    """``config.model``'s `OPTION_FIELDS` at `VAE`'s defaults, with ``overrides``: the one
    home of those defaults for every config file."""
    unknown = set(overrides) - set(OPTION_FIELDS)
    if unknown:
        raise ValueError(f"models.options: {sorted(unknown)} are not among {OPTION_FIELDS}.")
    defaults = {f.name: f.default for f in dataclasses.fields(VAE) if f.name in OPTION_FIELDS}
    return {**defaults, **overrides}
