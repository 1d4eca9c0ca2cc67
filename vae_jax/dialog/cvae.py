"""The conditional VAE of dialog response generation (Zhao et al. 2017, their "CVAE" baseline,
trained by Fu et al. 2019 with cyclical annealing, Sec. 5.2).

A context c is the last utterances before a response x (each with its speaker relative to the
response's: the "floor"), the conversation's topic and both callers' profiles:

    u_i     = [→GRU; ←GRU](embed(utterance_i))                 the utterance encoder (bi-GRU)
    h_c     = GRU([u_i; onehot(floor_i)]) at the last utterance   the context encoder
    c       = [embed_topic(topic); my_profile; other_profile; h_c]
    q(z|x,c) = N(μ, diag σ²),  [μ; log σ²] = W_q [c; u(x)]          the recognition network
    p(z|c)   = N(μ', diag σ'²), [μ'; log σ'²] = W_p tanh(W [c])     the prior network
    p(x|z,c) = Π_t p(x_t | x_<t, z, c): GRU from h₀ = W_h [c; z] over embed(x_<t) → W_o
    bag of words: p(x_t | z, c) = softmax(W_b tanh(W [c; z]))      Zhao et al.'s auxiliary loss

trained on Rec + β·KL(q(z|x,c) ‖ p(z|c)), + BOW for CVAE+BoW (``use_bow``; Zhao et al. 2017,
Eq. 5 with the bag-of-words term; `vae_jax.core.objectives` computes the KL to the prior the
outputs carry, `vae_jax.core.forward` adds the bag-of-words term). Responses are sampled with
z ~ p(z|c) and greedy decoding, as in the official code (snakeztc/NeuralDialog-CVAE,
``use_hcf = False``).

Deviations from the official TensorFlow code, structural only: the GRU is the cuDNN/PyTorch
variant (the reset gate scales W_h·h + b_h, where TF's GRUCell scales h before its matmul), and
its gate biases start like every other parameter, U(−init_scale, init_scale), where TF starts
them at 1. A utterance's bi-GRU stops at its last true token in both directions, as the
official code's ``sequence_length`` makes it do.

``dtype="bfloat16"`` rounds every matmul's operands to bfloat16 (`kernels.dot`: float32
accumulation; parameters, activations and the loss stay float32), for speed.

Batch layout (`vae_jax.data.batching`): ``tokens`` (B, T) the response ``<s> w … </s>``;
``context`` (B, C, L) the utterances before it (oldest first), ``context_lengths`` (B,),
``floors`` (B, C) (1: the response's speaker), ``topics`` (B,), ``my_profile`` and
``other_profile`` (B, 4). Filler rows (all-padding responses) count for nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from vae_jax.core import kernels
from vae_jax.core.kernels import FusedBiasDense
from vae_jax.core.models import uniform_init
from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID, sequence_lengths

PROFILE_DIM = 4  # [age / 100, education / 3, male, female], the official profile vector


def reverse_within(x: jnp.ndarray, lengths: jnp.ndarray) -> jnp.ndarray:
    """Each row's first ``lengths[b]`` steps reversed, the padding after them left in place."""
    t = jnp.arange(x.shape[1])[None, :]
    index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


class GRU(nn.Module):
    """A GRU layer (`kernels.gru_scan`) with U(−init_scale, init_scale) parameters; the input
    projection of all steps is one matmul before the loop."""

    features: int
    init_scale: float
    kernels: str = "auto"  # `kernels.implementation`: the CPU-tuned custom VJPs or plain JAX
    dtype: str = "float32"  # the matmuls' operands (`kernels.dot`); parameters stay float32

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, lengths: jnp.ndarray, h0: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        init = uniform_init(self.init_scale)
        h = self.features
        w_x = self.param("w_x", init, (x.shape[-1], 3 * h))
        b_x = self.param("b_x", init, (3 * h,))
        w_h = self.param("w_h", init, (h, 3 * h))
        b_h = self.param("b_h", init, (3 * h,))
        if h0 is None:
            h0 = jnp.zeros((x.shape[0], h), x.dtype)
        k = kernels.implementation(self.kernels, self.dtype)
        return k.gru_scan(k.affine(x, w_x, b_x), w_h, b_h, h0, lengths)


class CVAE(nn.Module):
    """Zhao et al.'s CVAE; sizes are the official code's (``config.model``)."""

    vocab_size: int
    num_topics: int
    emb_dim: int = 200
    topic_emb_dim: int = 30
    utt_hidden_dim: int = 300  # each direction of the utterance encoder
    ctx_hidden_dim: int = 600
    dec_hidden_dim: int = 400
    latent_dim: int = 200
    bow_hidden_dim: int = 400
    init_scale: float = 0.08
    # Zhao et al.'s bag-of-words loss (their "CVAE+BoW"); False: the plain CVAE, which has no
    # bag-of-words head at all (the official ``use_bow = False``).
    use_bow: bool = True
    kernels: str = "auto"  # the layers' implementation (`vae_jax.core.kernels.implementation`)
    # The matmuls' operands: "bfloat16" rounds them (float32 accumulation, parameters, loss).
    dtype: str = "float32"

    def setup(self):
        init = uniform_init(self.init_scale)
        fused = kernels.implementation(self.kernels, self.dtype).fused_dense

        def dense(features: int, name: str) -> FusedBiasDense:
            # nn.Dense's parameters (kernel, bias), the bias gradient in the kernel's product.
            return FusedBiasDense(features, init, init, fused=fused, dtype=self.dtype, name=name)

        def gru(features: int) -> GRU:
            return GRU(features, self.init_scale, self.kernels, self.dtype)

        self.embed = nn.Embed(self.vocab_size, self.emb_dim, embedding_init=init)
        self.topic_embed = nn.Embed(self.num_topics, self.topic_emb_dim, embedding_init=init)
        self.utt_fwd = gru(self.utt_hidden_dim)
        self.utt_bwd = gru(self.utt_hidden_dim)
        self.ctx_rnn = gru(self.ctx_hidden_dim)
        self.recog = dense(2 * self.latent_dim, "recog")
        self.prior_hidden = dense(max(2 * self.latent_dim, 100), "prior_hidden")
        self.prior_out = dense(2 * self.latent_dim, "prior_out")
        if self.use_bow:
            self.bow_hidden = dense(self.bow_hidden_dim, "bow_hidden")
            self.bow_out = dense(self.vocab_size, "bow_out")
        self.dec_init = dense(self.dec_hidden_dim, "dec_init")
        self.dec_rnn = gru(self.dec_hidden_dim)
        self.dec_out = dense(self.vocab_size, "dec_out")

    def embed_words(self, tokens: jnp.ndarray) -> jnp.ndarray:
        # <pad> embeds to 0, as the official code masks its row.
        return jnp.where((tokens != PAD_ID)[..., None], self.embed(tokens), 0.0)

    def encode_utterances(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """[last forward state; last backward state] (…, 2·utt_hidden_dim) of utterances
        ``tokens`` (…, L), each read up to its last true token."""
        shape = tokens.shape[:-1]
        flat = tokens.reshape(-1, tokens.shape[-1])
        lengths = sequence_lengths(flat)
        x = self.embed_words(flat)
        _, forward_last = self.utt_fwd(x, lengths)
        _, backward_last = self.utt_bwd(reverse_within(x, lengths), lengths)
        return jnp.concatenate([forward_last, backward_last], -1).reshape(*shape, -1)

    def condition(self, batch: dict[str, jnp.ndarray]) -> jnp.ndarray:
        """c = [topic embedding; my profile; other profile; context state] (B, ·)."""
        utterances = self.encode_utterances(batch["context"])  # (B, C, 2H)
        floors = jax.nn.one_hot(batch["floors"], 2, dtype=utterances.dtype)
        lengths = jnp.maximum(batch["context_lengths"], 1)  # filler rows: one (empty) step
        _, h_context = self.ctx_rnn(jnp.concatenate([utterances, floors], -1), lengths)
        return jnp.concatenate(
            [
                self.topic_embed(batch["topics"]),
                batch["my_profile"].astype(h_context.dtype),
                batch["other_profile"].astype(h_context.dtype),
                h_context,
            ],
            -1,
        )

    def prior(self, c: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """μ', log σ'² of p(z|c)."""
        return jnp.split(self.prior_out(jnp.tanh(self.prior_hidden(c))), 2, axis=-1)

    def posterior(self, c: jnp.ndarray, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """μ, log σ² of q(z|x, c), from the response's utterance encoding."""
        x = jnp.concatenate([c, self.encode_utterances(tokens)], -1)
        return jnp.split(self.recog(x), 2, axis=-1)

    def bow_nll(self, c: jnp.ndarray, z: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
        """−Σ_t log p_bow(x_t | z, c) over the response's targets (B,): every word predicted
        from one softmax, order ignored (Zhao et al. 2017, Sec. 3.3)."""
        logits = self.bow_out(jnp.tanh(self.bow_hidden(jnp.concatenate([c, z], -1))))
        log_p = jax.nn.log_softmax(logits)
        targets = tokens[:, 1:]
        picked = jnp.take_along_axis(log_p, targets, axis=-1)
        return -jnp.sum(jnp.where(targets != PAD_ID, picked, 0.0), -1)

    def decode(self, tokens: jnp.ndarray, c: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
        """Teacher-forced logits (B, T − 1, V) of the targets ``tokens[:, 1:]``."""
        inputs = tokens[:, :-1]
        h0 = self.dec_init(jnp.concatenate([c, z], -1))
        lengths = jnp.full(inputs.shape[:1], inputs.shape[1])  # the targets' mask does the rest
        hs, _ = self.dec_rnn(self.embed_words(inputs), lengths, h0)
        return self.dec_out(hs)

    def generate(
        self,
        batch: dict[str, jnp.ndarray],
        keys: jnp.ndarray,
        max_length: int,
        z: jnp.ndarray | None = None,
        num_samples: int = 1,
    ) -> jnp.ndarray:
        """Responses (B·S, max_length) decoded greedily, S = ``num_samples`` per context (rows
        in (context, sample) order), each from its own z ~ p(z|c) drawn from its key in
        ``keys`` (B·S, 2), or from the given ``z``: ``w₁ … w_n </s>`` then ``<pad>`` (a row
        without ``</s>`` was cut). The context is encoded once for its S samples."""
        c = jnp.repeat(self.condition(batch), num_samples, axis=0)
        if z is None:
            z = sample(*self.prior(c), keys)
        gru = self.dec_rnn
        h = self.dec_init(jnp.concatenate([c, z], -1))
        params = gru.variables["params"]
        w_x, b_x, w_h, b_h = (params[n] for n in ("w_x", "b_x", "w_h", "b_h"))
        table = self.embed.embedding
        out_kernel = self.dec_out.variables["params"]["kernel"]
        out_bias = self.dec_out.variables["params"]["bias"]
        batch_size = c.shape[0]

        def step(carry, _):
            h, prev, done = carry
            x = jnp.where((prev != PAD_ID)[:, None], table[prev], 0.0)
            one = jnp.ones((batch_size,), jnp.int32)
            gates_x = kernels.dot(x, w_x, self.dtype) + b_x
            _, h = kernels.plain_gru_scan(gates_x[:, None], w_h, b_h, h, one, self.dtype)
            logits = kernels.dot(h, out_kernel, self.dtype) + out_bias
            logits = logits.at[:, jnp.array([PAD_ID, BOS_ID])].set(-jnp.inf)
            token = jnp.where(done, PAD_ID, jnp.argmax(logits, -1)).astype(jnp.int32)
            return (h, token, done | (token == EOS_ID)), token

        start = jnp.full((batch_size,), BOS_ID, jnp.int32)
        init = (h, start, jnp.zeros((batch_size,), bool))
        _, tokens = jax.lax.scan(step, init, None, length=max_length)
        return tokens.T

    def __call__(
        self, batch: dict[str, jnp.ndarray], keys: jnp.ndarray, *, train: bool
    ) -> dict[str, jnp.ndarray]:
        """One z ~ q(z|x, c) per example and the teacher-forced decoding.

        Returns ``logits`` (B, T − 1, V); ``mu``, ``logvar`` (q's), ``prior_mu``,
        ``prior_logvar`` (p(z|c)'s) and ``z`` (B, latent_dim); ``bow_nll`` (B,) where
        ``use_bow``; ``bn_stats`` (empty: the train step's interface). No dropout (the
        official ``keep_prob = 1``)."""
        del train
        tokens = batch["tokens"]
        c = self.condition(batch)
        mu, logvar = self.posterior(c, tokens)
        prior_mu, prior_logvar = self.prior(c)
        z = sample(mu, logvar, keys)
        outputs = {
            "logits": self.decode(tokens, c, z),
            "mu": mu,
            "logvar": logvar,
            "prior_mu": prior_mu,
            "prior_logvar": prior_logvar,
            "z": z,
            "bn_stats": {},
        }
        if self.use_bow:
            outputs["bow_nll"] = self.bow_nll(c, z, tokens)
        return outputs

    def updated_bn_stats(self, params: dict, stats: dict) -> dict:
        """No batch normalisation: ``params`` unchanged (the train step's interface)."""
        del stats
        return params

    def example_batch(self, context: int = 2, length: int = 3) -> dict[str, jnp.ndarray]:
        """A one-row batch of the layout above, to initialise parameters with."""
        return {
            "tokens": jnp.zeros((1, length), jnp.int32),
            "context": jnp.zeros((1, context, length), jnp.int32),
            "context_lengths": jnp.ones((1,), jnp.int32),
            "floors": jnp.zeros((1, context), jnp.int32),
            "topics": jnp.zeros((1,), jnp.int32),
            "my_profile": jnp.zeros((1, PROFILE_DIM), jnp.float32),
            "other_profile": jnp.zeros((1, PROFILE_DIM), jnp.float32),
        }


def sample(mu: jnp.ndarray, logvar: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
    """z = μ + σ ⊙ ε, ε ~ N(0, I) from each row's key."""
    eps = jax.vmap(lambda k: jax.random.normal(k, mu.shape[1:], mu.dtype))(keys)
    return mu + jnp.exp(0.5 * logvar) * eps
