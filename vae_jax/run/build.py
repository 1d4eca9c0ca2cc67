"""The one place a config becomes a model, its data and its task's readers.

Every task registers here, by ``config.model.kind`` (`TASKS`): its model factory, its data and,
where its test differs from the language-model VAE's, its evaluation and its samples. The loop,
`vae_jax.evaluate`, `vae_jax.generate` and `vae_jax.load` reach a wing (e.g.
`vae_jax.dialog`) only through here. Adding a task: a model module, a dataset, a config and an
entry in `TASKS`.

The model's forward pass is `vae_jax.core.forward.apply` for every kind (a model reading more
than ``tokens`` defines ``example_batch``), so an SA-VAE or a CVAE is scored where it is trained.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from vae_jax.core import forward, models, savae
from vae_jax.data import batching, text
from vae_jax.dialog import batcher as dialog_batcher
from vae_jax.dialog import cvae, evaluation, responses, swda
from vae_jax.run import checkpoints, files, population, workdirs


@dataclasses.dataclass(frozen=True)
class Task:
    """A model kind as the rest of vae_jax sees it.

    ``make_model(config, vocab_size, num_topics)``; ``evaluate`` (None: the VAE's test in
    `vae_jax.evaluate`) and ``sample`` (None: sentences from the prior) are its own readers;
    ``loadable``: whether `vae_jax.load` can return it as a `vae_jax.api.TrainedVAE`.
    """

    make_model: Callable[..., nn.Module]
    evaluate: Callable[..., dict[str, Any]] | None = None
    sample: Callable[..., list[str]] | None = None
    loadable: bool = True


def _language_model(config: ml_collections.ConfigDict, vocab_size: int, num_topics: int = 0):
    """The VAE, or an `savae.SAVAE` (refined by SVI) when ``svi_steps`` > 0."""
    del num_topics
    fields = _model_fields(config)
    fields.pop("kind", None)
    if fields.get("svi_steps", 0) > 0:
        return savae.SAVAE(vocab_size=vocab_size, **fields)
    fields = {k: v for k, v in fields.items() if k not in savae.SVI_FIELDS}
    return models.VAE(vocab_size=vocab_size, **fields)


def _dialog_model(config: ml_collections.ConfigDict, vocab_size: int, num_topics: int = 0):
    if num_topics < 1:
        raise ValueError("make_model: a CVAE needs the number of topics of its data.")
    fields = _model_fields(config)
    fields.pop("kind")
    return cvae.CVAE(vocab_size=vocab_size, num_topics=num_topics, **fields)


TASKS: dict[str, Task] = {
    "vae": Task(_language_model),
    "cvae": Task(
        _dialog_model,
        evaluate=evaluation.evaluate_run,
        sample=responses.sample_run,
        loadable=False,
    ),
}


def _model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    # Lists (a config read back from JSON) as tuples: a module is a static, hashed argument.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}


def task(config: ml_collections.ConfigDict) -> Task:
    """The `Task` of ``config.model.kind`` (default "vae")."""
    kind = config.model.get("kind", "vae")
    if kind not in TASKS:
        raise ValueError(f"config.model.kind={kind!r}: must be one of {sorted(TASKS)}.")
    return TASKS[kind]


def make_model(
    config: ml_collections.ConfigDict, vocab_size: int, num_topics: int = 0
) -> nn.Module:
    """The model of ``config.model``: a `cvae.CVAE` where ``kind`` is "cvae" (``num_topics``
    from its data), else the VAE, an `savae.SAVAE` (refined by SVI) when svi_steps > 0."""
    return task(config).make_model(config, vocab_size, num_topics)


def get_data(config: ml_collections.ConfigDict) -> batching.Data:
    """The dataset named by ``config.data.name``: a text corpus, SwitchBoard or the synthetic
    sequences."""
    name = config.data.name
    if name in text.CORPORA:
        return batching.get_text_data(config)
    if name == swda.NAME:
        return dialog_batcher.get_dialog_data(config)
    if name == "synthetic":
        return batching.get_synthetic_data(config)
    raise ValueError(
        f"config.data.name={name!r}: must be one of "
        f"{['synthetic', swda.NAME, *sorted(text.CORPORA)]}."
    )


def eval_key(config: ml_collections.ConfigDict) -> jax.Array:
    """The key of a run's ELBO evaluation, in training and in `vae_jax.evaluate` alike, so
    that the two report the same figures for the same parameters."""
    return jax.random.PRNGKey(config.seed + 1)


def check_params(model: models.VAE, params: Any, where: str) -> None:
    """Raises ``ValueError`` naming ``where`` unless ``params`` has the shapes ``model`` makes."""
    example = forward.example_batch(model)
    fresh = jax.eval_shape(lambda: forward.init(model, jax.random.PRNGKey(0), example))
    expected = {"params": fresh}
    want = {
        jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)
    }
    have = {
        jax.tree_util.keystr(p): np.shape(x)
        for p, x in jax.tree_util.tree_leaves_with_path({"params": params})
    }
    if want != have:
        diff = sorted(
            f"{k}: checkpoint {have.get(k, 'missing')}, config {want.get(k, 'missing')}"
            for k in set(want) | set(have)
            if want.get(k) != have.get(k)
        )
        raise ValueError(
            f"{where}: parameters do not match the model of config.model: " + "; ".join(diff[:5])
        )


def load_run(
    workdir: str, checkpoint: str = "auto", data_dir: str | None = None, member: int | None = None
) -> tuple[ml_collections.ConfigDict, batching.Data, models.VAE, Any, dict]:
    """Config, data, model, parameters and checkpoint info of a run's workdir.

    ``checkpoint``: ``best`` (lowest valid PPL bound), ``last``, a step number, or ``auto``
    (`workdirs.resolve_checkpoint`); the info's ``checkpoint`` says which was loaded.
    ``data_dir`` overrides ``config.data.data_dir`` (corpora moved since training).
    ``member``: which member of a population (`vae_jax.run.population`) workdir; its own config
    and ``best/`` are under ``WORKDIR/members/<k>/``, its slice of the population's
    checkpoints under ``WORKDIR/checkpoints/``. The info's ``run_dir`` is the directory of
    the run read (the member's for a population), where its readers write their results.
    """
    files.check_local_path(workdir)
    config = workdirs.load_config(workdir)
    run_dir = workdir
    if population.is_population(config):
        k = population.size(config)
        if member is None or not 0 <= member < k:
            raise ValueError(
                f"--workdir={workdir} holds a population of {k} members: pass --member=<k> "
                f"with k in 0..{k - 1} (got {member})."
            )
        run_dir = population.member_dir(workdir, member)
        config = workdirs.load_config(run_dir)
    elif member not in (None, 0):
        raise ValueError(f"--member={member}: {workdir} is a single run, not a population.")
    if data_dir:
        config.data.data_dir = data_dir
    checkpoint = workdirs.resolve_checkpoint(run_dir, checkpoint)
    if run_dir != workdir and checkpoint != "best":
        params, info = checkpoints.restore_params(workdir, checkpoint)
        params = jax.tree.map(lambda x: np.asarray(x)[member], params)
    else:
        params, info = checkpoints.restore_params(run_dir, checkpoint)
    info = {"checkpoint": checkpoint, "run_dir": run_dir, **info}
    data = reader_data(config, run_dir, data_dir)
    model = make_model(config, data.vocab_size, data.num_topics)
    check_params(model, params, f"{run_dir} checkpoint {checkpoint!r}")
    return config, data, model, params, info


def choose_split(data: batching.Data, split: str | None) -> str:
    """``split``, else ``test`` where the data has one, else its first evaluation split."""
    if not split:
        return "test" if "test" in data.eval_splits else next(iter(data.eval_splits))
    if split not in data.eval_splits:
        raise ValueError(f"--split={split}: this run's data has splits {sorted(data.eval_splits)}.")
    return split


def init_params_from(config: ml_collections.ConfigDict, model: models.VAE, fresh: Any) -> Any:
    """The parameters of the run at ``config.init_from`` (its best checkpoint, else its last),
    with the top-level parameters whose names start with a prefix in ``config.init_reset``
    taken from ``fresh`` instead (e.g. ``("dec",)``: pre-trained encoder, new decoder; Li et al.
    2019). The optimizer state starts afresh."""
    which = workdirs.resolve_checkpoint(config.init_from, "auto")
    loaded, info = checkpoints.restore_params(config.init_from, which)
    check_params(model, loaded, f"config.init_from={config.init_from!r} ({which})")
    reset = tuple(config.init_reset)
    unknown = [p for p in reset if not any(name.startswith(p) for name in fresh)]
    if unknown:
        raise ValueError(
            f"config.init_reset={reset!r}: {unknown} match no parameter of {sorted(fresh)}."
        )
    params = {
        name: fresh[name] if reset and name.startswith(reset) else value
        for name, value in loaded.items()
    }
    logging.info(
        "Parameters from %s (%s, step %s); re-initialised: %s.",
        config.init_from,
        which,
        info.get("step"),
        sorted(n for n in params if reset and n.startswith(reset)) or "none",
    )
    return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), params, fresh)


def reader_data(
    config: ml_collections.ConfigDict, workdir: str, data_dir: str | None = None
) -> batching.Data:
    """A reader's data: the corpus where it can be read (checked against ``data.json``, and
    stored in the workdir if it was not), else the workdir's stored copy (`workdirs.stored_data`). A
    text run with neither fails naming the file it lacks and what to do."""
    has_copy = workdirs.stores_data(config) and os.path.exists(
        os.path.join(workdir, workdirs.SPLITS)
    )
    try:
        data = get_data(config)
    except (FileNotFoundError, ValueError) as e:
        if has_copy and not data_dir:
            logging.info(
                "%s: the corpus cannot be read (%s); the workdir's copy is used.", workdir, e
            )
            return workdirs.stored_data(config, workdir)
        if workdirs.stores_data(config) and not has_copy:
            raise FileNotFoundError(
                f"{os.path.join(workdir, workdirs.VOCAB)}: absent (a workdir written by an older "
                f"vae_jax) and the corpus cannot be read ({e}). Pass --data_dir=<the corpus "
                "the run was trained on> once: the workdir then stores its vocabulary and "
                "splits."
            ) from None
        raise
    if os.path.exists(
        os.path.join(workdir, workdirs.DATA)
    ):  # workdirs from before data.json: unchecked
        workdirs.bind_data(config, data, workdir)
        workdirs.store_data(config, data, workdir)
    return data
