"""Sentences from a trained run: prior samples, reconstructions and interpolations.

    python -m vae_jax.generate --workdir=runs/ptb_cyclical --mode prior [--num 5]
        [--temperature 1.0]
    python -m vae_jax.generate --workdir=runs/ptb_cyclical --mode reconstruct [--split test]
        [--sentence "the company said ..." ...]
    python -m vae_jax.generate --workdir=runs/ptb_cyclical --mode interpolate
        [--sentence "first sentence" --sentence "second sentence"]

- prior: z ~ N(0, I); each z is decoded greedily and by sampling at ``--temperature``.
- reconstruct: greedy decoding from the posterior mean μ(x) of each sentence.
- interpolate: greedy decoding from z_t = (1 − t) μ(x_a) + t μ(x_b), t = 0, 0.1, …, 1.
- responses (a dialog CVAE's run): for ``--num`` contexts drawn from ``--split`` (default
  test), the last utterances, the true response and ``--num_samples`` responses, each decoded
  greedily from its own z ~ p(z|c) (`vae_jax.dialog.responses`):

    python -m vae_jax.generate --workdir=runs/swda_cyclical --mode responses --num 3

Sentences come from ``--sentence`` (words of the corpus vocabulary; ids for the synthetic task,
which has no words) or else are drawn at random (``--seed``) from ``--split``. Text corpora
print words, the synthetic task prints ids.
"""

from vae_jax.run import host

if __name__ == "__main__":
    host.tune_cpu_host("vae_jax.generate")  # before jax loads: see vae_jax.run.host

import functools  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from vae_jax.core import metrics, models  # noqa: E402
from vae_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from vae_jax.data import batching  # noqa: E402
from vae_jax.data import text as text_data  # noqa: E402
from vae_jax.run import backend, build, cli  # noqa: E402


@functools.partial(jax.jit, static_argnames=("model", "max_length"))
def _generate(
    params: Any,
    z: jnp.ndarray,
    keys: jnp.ndarray | None,
    temperature: float,
    *,
    model: models.VAE,
    max_length: int,
) -> jnp.ndarray:
    return model.apply(
        {"params": params}, z, max_length, keys, temperature, method=models.VAE.generate
    )


PROG = "python -m vae_jax.generate"


def decode(
    model: models.VAE,
    params: Any,
    z: np.ndarray,
    max_length: int,
    key: jax.Array | None = None,
    temperature: float = 1.0,
) -> np.ndarray:
    """Token ids (B, max_length) decoded from z (B, D): greedy, or sampled when ``key``."""
    keys = None if key is None else jax.random.split(key, z.shape[0])
    return np.asarray(
        _generate(params, jnp.asarray(z), keys, temperature, model=model, max_length=max_length)
    )


def posterior_means(model: models.VAE, params: Any, rows: Sequence[np.ndarray]) -> np.ndarray:
    """μ(x) (N, D) of token rows ``<s> w… </s>`` of any lengths."""
    tokens = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return np.asarray(model.apply({"params": params}, tokens, method=models.VAE.encode)[0])


def interpolation_points(mu_a: np.ndarray, mu_b: np.ndarray, steps: int = 10) -> np.ndarray:
    """z_t = (1 − t) μ_a + t μ_b for t = 0, 1/steps, …, 1: (steps + 1, D)."""
    t = np.linspace(0.0, 1.0, steps + 1)[:, None]
    return (1.0 - t) * mu_a[None] + t * mu_b[None]


class Text:
    """Ids <-> printable text: words for text corpora, ids for the synthetic task."""

    def __init__(self, vocab: text_data.Vocab | None):
        self.vocab = vocab

    def row(self, sentence: str) -> np.ndarray:
        """``<s> w… </s>`` ids of a sentence given on the command line."""
        if self.vocab is not None:
            return batching.with_boundaries(self.vocab.encode(sentence))
        try:
            ids = [int(w) for w in sentence.split()]
        except ValueError:
            raise ValueError(
                f"--sentence={sentence!r}: this task has no vocabulary; give token ids "
                "separated by spaces."
            ) from None
        return batching.with_boundaries(np.array(ids, np.int32))

    def show(self, ids: np.ndarray) -> str:
        """Words (or ids) up to the first ``</s>``, without ``<s>``/``<pad>``."""
        if self.vocab is not None:
            return self.vocab.decode(ids)
        out = []
        for i in np.asarray(ids).tolist():
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(str(i))
        return " ".join(out)


def _rows(fv: flags.FlagValues, text: Text, data: batching.Data, n: int) -> list:
    """The ``--sentence`` rows, else ``n`` sentences of the split drawn with ``--seed``."""
    if fv.sentence:
        return [text.row(s) for s in fv.sentence]
    rows = metrics.split_rows(data.eval_splits[build.choose_split(data, fv.split)])
    # Evaluation batches run shortest first: a prefix would hold only the shortest sentences.
    pick = np.random.default_rng(fv.seed).choice(len(rows), min(n, len(rows)), replace=False)
    return [rows[i] for i in pick]


def define_flags(fv: flags.FlagValues) -> None:
    """This command's flags, on ``fv``."""
    cli.define_run_flags(fv)
    flags.DEFINE_enum(
        "mode",
        None,
        ["prior", "reconstruct", "interpolate", "responses"],
        "What to decode (responses: a dialog run's).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num", 5, "Prior samples / reconstructions.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_float("temperature", 1.0, "Of prior sampling (> 0).", flag_values=fv)
    flags.DEFINE_integer("max_length", 50, "Tokens per sentence.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("split", "", "Sentences from here if no --sentence.", flag_values=fv)
    flags.DEFINE_multi_string("sentence", [], "Input sentence (repeatable).", flag_values=fv)
    flags.DEFINE_integer("steps", 10, "Interpolation intervals.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Of prior samples and drawn sentences.", flag_values=fv)
    flags.DEFINE_integer(
        "num_samples", 5, "Responses per context (--mode responses).", lower_bound=1,
        flag_values=fv,
    )  # fmt: skip
    flags.mark_flag_as_required("mode", flag_values=fv)
    flags.register_validator(
        "temperature", lambda t: t > 0, "--temperature must be > 0.", flag_values=fv
    )
    flags.register_multi_flags_validator(
        ["mode", "sentence"],
        lambda f: f["mode"] != "interpolate" or not f["sentence"] or len(f["sentence"]) == 2,
        "--mode=interpolate takes two --sentence.",
        flag_values=fv,
    )


def run(fv: flags.FlagValues) -> list[str]:
    """Decodes as the parsed flags ``fv`` say; returns the printed lines."""
    config, data, model, params, info = build.load_run(
        fv.workdir, fv.checkpoint, fv.data_dir, fv.member
    )
    with jax.default_matmul_precision(backend.matmul_precision(config)):
        return _run(fv, config, data, model, params, info)


def _run(fv, config, data, model, params, info) -> list[str]:
    print(
        f"# {info['run_dir']}, checkpoint {info['checkpoint']} (step {info.get('step')})",
        file=sys.stderr,
    )
    key = jax.random.PRNGKey(fv.seed)
    sample = build.task(config).sample  # a task's own samples (the dialog CVAE's responses)
    if (sample is not None) != (fv.mode == "responses"):
        raise ValueError(
            f"--mode={fv.mode}: a dialog CVAE's run takes --mode=responses, and only it does."
        )
    if sample is not None:
        lines = sample(fv, data, model, params, key)
        print("\n".join(lines))
        return lines
    lines = []
    text = Text(data.info.get("vocab"))
    if fv.mode == "prior":
        z = np.asarray(jax.random.normal(key, (fv.num, model.latent_dim)))
        greedy = decode(model, params, z, fv.max_length)
        sampled = decode(
            model, params, z, fv.max_length, jax.random.fold_in(key, 1), fv.temperature
        )
        for i in range(fv.num):
            lines += [
                f"z{i} greedy: {text.show(greedy[i])}",
                f"z{i} T={fv.temperature:g}: {text.show(sampled[i])}",
            ]
    elif fv.mode == "reconstruct":
        rows = _rows(fv, text, data, fv.num)
        out = decode(model, params, posterior_means(model, params, rows), fv.max_length)
        for row, rec in zip(rows, out, strict=True):
            lines += [f"input: {text.show(row)}", f"recon: {text.show(rec)}", ""]
    else:
        rows = _rows(fv, text, data, 2)
        if len(rows) < 2:
            raise ValueError("--mode=interpolate: the split has fewer than two sentences.")
        mu = posterior_means(model, params, rows)
        out = decode(model, params, interpolation_points(mu[0], mu[1], fv.steps), fv.max_length)
        lines.append(f"a: {text.show(rows[0])}")
        for t, ids in zip(np.linspace(0.0, 1.0, fv.steps + 1), out, strict=True):
            lines.append(f"{t:.2f}: {text.show(ids)}")
        lines.append(f"b: {text.show(rows[1])}")
    print("\n".join(lines))
    return lines


def main(argv: Sequence[str]) -> list[str]:
    """Runs the command with the flags in ``argv`` (no program name), as from a notebook or a
    test; a bad flag exits with status 2 and a one-line message, as on the command line."""
    return run(cli.parse(define_flags, PROG, argv))


if __name__ == "__main__":
    cli.run_command(define_flags, run, PROG)
