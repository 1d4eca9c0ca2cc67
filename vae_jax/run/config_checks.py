"""Checks of a config's values, run before any data is read or anything compiles.

Unknown keys are caught earlier, by ``lock_config`` (``main.py``). Every error names the field,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os

import ml_collections

from vae_jax.core import kernels, models, objectives, schedules
from vae_jax.data import batching, text
from vae_jax.dialog import swda
from vae_jax.run import backend, population, workdirs

_SCHEDULE_VALUES = ("value", "init_value", "start", "stop")
_MODEL_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(models.VAE) if f.name not in ("parent", "name")
}
_MODEL_SIZES = ("enc_emb_dim", "enc_hidden_dim", "dec_emb_dim", "dec_hidden_dim", "latent_dim")


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"config.{field}={value!r}: {allowed}.")


def _positive_int(config: ml_collections.ConfigDict, field: str) -> None:
    value = config
    for part in field.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, value, "must be a positive integer")


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ValueError`` (``FileNotFoundError`` for data paths) on the first bad field."""
    for field in ("batch_size", "eval_batch_size", "log_every_steps"):
        _positive_int(config, field)
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % num_devices:
            _fail(
                field,
                config[field],
                f"must be a multiple of the {num_devices} devices (of all processes)",
            )
    if config.get("num_epochs", -1) > 0:
        _positive_int(config, "num_epochs")
    else:
        _positive_int(config, "num_train_steps")
    if config.get("eval_every_epochs", -1) <= 0:
        _positive_int(config, "eval_every_steps")
    for field in ("checkpoint_every_steps", "checkpoints_to_keep", "max_nonfinite_steps"):
        if field in config:
            _positive_int(config, field)
    bound = config.get("collective_timeout_s", 0.0)
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound >= 0:
        _fail("collective_timeout_s", bound, "must be a number of seconds >= 0 (0: no bound)")
    period = config.checkpoint_keep_period
    if isinstance(period, bool) or not isinstance(period, int) or period < 0:
        _fail("checkpoint_keep_period", period, "must be an integer >= 0 (0: none kept)")
    every = config.get("checkpoint_keep_every_epochs", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        _fail("checkpoint_keep_every_epochs", every, "must be an integer >= 0 (0: none kept)")
    if "early_stopping" in config:
        _check_early_stopping(config)
    spike = config.loss_spike
    if not (math.isfinite(spike.factor) and (spike.factor == 0 or spike.factor > 1)):
        _fail("loss_spike.factor", spike.factor, "must be 0 (off) or a finite number > 1")
    _positive_int(config, "loss_spike.window")
    if spike.action not in ("skip", "stop"):
        _fail("loss_spike.action", spike.action, "must be 'skip' or 'stop'")

    backend.matmul_precision(config)
    # Every model's layers (`vae_jax.core.kernels`).
    if config.model.get("kernels", "auto") not in kernels.KERNELS:
        _fail("model.kernels", config.model.kernels, f"must be one of {kernels.KERNELS}")
    if config.model.get("dtype", "float32") not in kernels.DTYPES:
        _fail("model.dtype", config.model.dtype, f"must be one of {kernels.DTYPES}")
    if config.model.get("kind", "vae") == "cvae":
        _check_cvae_model(config)
    else:
        _check_vae_model(config)
    if not config.model.init_scale > 0:
        _fail("model.init_scale", config.model.init_scale, "must be > 0")
    if not config.grad_clip_norm > 0:
        _fail("grad_clip_norm", config.grad_clip_norm, "must be > 0")
    if workdirs.best_metric(config) not in workdirs.BEST_METRICS:
        _fail("best_metric", config.best_metric, f"must be one of {workdirs.BEST_METRICS}")
    if config.objective not in objectives.OBJECTIVES:
        _fail("objective", config.objective, f"must be one of {sorted(objectives.OBJECTIVES)}")
    if config.objective == "free_bits":
        lam = config.free_bits.lambda_per_dim
        if not (math.isfinite(lam) and lam >= 0):
            _fail("free_bits.lambda_per_dim", lam, "must be a finite number of nats >= 0")
    if config.objective == "dg_vae":
        _positive_int(config, "dg_vae.num_samples")
        size = config.dg_vae.chunk_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            _fail("dg_vae.chunk_size", size, "must be an integer >= 0 (0: the whole batch)")
    if not isinstance(config.init_from, str):
        _fail("init_from", config.init_from, "must be a workdir path or ''")
    if config.init_from and not os.path.exists(os.path.join(config.init_from, "config.json")):
        raise FileNotFoundError(
            f"config.init_from={config.init_from!r}: no run there (no config.json)."
        )

    if config.schedule_unit not in schedules.UNITS:
        _fail("schedule_unit", config.schedule_unit, "must be 'steps' or 'epochs'")
    if config.schedule_unit == "epochs" and config.data.name == "synthetic":
        _fail("schedule_unit", "epochs", "the synthetic stream has no epochs; use 'steps'")
    for field in ("beta_schedule", "lr_schedule"):
        try:  # the factory checks names and values; any scale of epochs checks them
            fields = schedules.in_steps(config[field].to_dict(), config.schedule_unit, 1_000)
            schedules.make_schedule(fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"config.{field}: {e}") from None
    # Values the factories accept but that turn training around: lr < 0 ascends the loss,
    # β < 0 maximises the KL; NaN makes every step non-finite.
    for field in ("lr_schedule", "beta_schedule"):
        for name in _SCHEDULE_VALUES:
            value = config[field].get(name)
            if value is None:
                continue
            rate = field == "lr_schedule" and name in ("value", "init_value")
            if not math.isfinite(value) or value < 0 or (rate and value == 0):
                allowed = "a finite learning rate > 0" if rate else "finite and >= 0"
                if field == "beta_schedule":
                    allowed = "a finite KL weight >= 0"
                _fail(f"{field}.{name}", value, f"must be {allowed}")

    seed = config.get("data_seed", -1)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < -1:
        _fail("data_seed", seed, "must be an integer >= 0, or -1 (config.seed)")
    population.check(config)
    if population.is_population(config):
        for member in population.members(config):  # each member's values, as a single run
            check_config(member, num_devices)
        return
    _check_data(config)


def _check_vae_model(config: ml_collections.ConfigDict) -> None:
    for field in _MODEL_SIZES:
        _positive_int(config, f"model.{field}")
    for field in ("dec_dropout_in", "dec_dropout_out"):
        rate = config.model[field]
        if not 0.0 <= rate < 1.0:
            _fail(f"model.{field}", rate, "must be in [0, 1)")
    gamma, momentum = config.model.get("bn_gamma", 0.0), config.model.get("bn_momentum", 0.9)
    if not (math.isfinite(gamma) and gamma >= 0):
        _fail("model.bn_gamma", gamma, "must be a finite number >= 0 (0: no BN-VAE)")
    if not 0.0 <= momentum < 1.0:
        _fail("model.bn_momentum", momentum, "must be in [0, 1)")
    # Fields a config leaves out take the model's defaults.
    model = {**_MODEL_DEFAULTS, **config.model.to_dict()}
    encoder = model["encoder"]
    if encoder not in ("lstm", "cnn"):
        _fail("model.encoder", encoder, "must be 'lstm' or 'cnn'")
    if encoder == "cnn":
        filters = tuple(model["cnn_filters"])
        if not filters or any(
            isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in filters
        ):
            _fail("model.cnn_filters", filters, "must be a non-empty tuple of positive integers")
        for field in ("cnn_width", "cnn_stride", "cnn_length"):
            value = model[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(f"model.{field}", value, "must be a positive integer")
        length = model["cnn_length"]
        if config.data.name != "synthetic" and config.data.max_length + 1 > length:
            _fail(
                "model.cnn_length", length,
                f"the CNN window must hold the longest row, data.max_length="
                f"{config.data.max_length} words plus </s>",
            )  # fmt: skip
        if config.data.name == "synthetic" and config.data.length + 1 > length:
            _fail("model.cnn_length", length, "must be >= data.length + 1")
    if model["embedding"] not in ("separate", "shared_normalized"):
        _fail("model.embedding", model["embedding"], "must be 'separate' or 'shared_normalized'")
    if model["embedding"] == "shared_normalized" and model["enc_emb_dim"] != model["dec_emb_dim"]:
        _fail("model.enc_emb_dim", model["enc_emb_dim"], "must equal model.dec_emb_dim (shared)")


def _check_early_stopping(config: ml_collections.ConfigDict) -> None:
    """`vae_jax.run.early_stopping`'s fields; the rule reads the valid split of a single run."""
    rule = config.early_stopping
    patience = rule.patience
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        _fail("early_stopping.patience", patience, "must be an integer >= 0 (0: off)")
    if patience == 0:
        return
    if not 0 < rule.improve_threshold <= 1:
        _fail("early_stopping.improve_threshold", rule.improve_threshold, "must be in (0, 1]")
    if not rule.patience_increase >= 1:
        _fail("early_stopping.patience_increase", rule.patience_increase, "must be >= 1")
    if "valid" not in config.data.eval_splits:
        _fail("data.eval_splits", config.data.eval_splits, "early stopping needs 'valid'")
    if config.population_size > 1:
        _fail(
            "early_stopping.patience", patience,
            "must be 0 for a population (its members would stop at different steps)",
        )  # fmt: skip


_CVAE_SIZES = (
    "emb_dim", "topic_emb_dim", "utt_hidden_dim", "ctx_hidden_dim", "dec_hidden_dim",
    "latent_dim", "bow_hidden_dim",
)  # fmt: skip


def _check_cvae_model(config: ml_collections.ConfigDict) -> None:
    """A dialog CVAE: its sizes, its data (a dialog corpus) and the objectives that have a
    meaning with a conditional prior."""
    for field in _CVAE_SIZES:
        _positive_int(config, f"model.{field}")
    if config.data.name != swda.NAME:
        _fail(
            "data.name",
            config.data.name,
            f"model.kind='cvae' needs the dialog corpus {swda.NAME!r}",
        )
    if config.objective == "dg_vae":
        _fail("objective", "dg_vae", "the density gap is to N(0, I); a CVAE's prior is p(z|c)")
    if not isinstance(config.model.get("use_bow", True), bool):
        _fail("model.use_bow", config.model.use_bow, "must be True (CVAE+BoW) or False (CVAE)")


def _check_splits(d: ml_collections.ConfigDict, splits) -> None:
    """``data.train_split`` and every ``data.eval_splits`` among the corpus's ``splits``."""
    for field, names in (
        ("data.train_split", [d.train_split]),
        ("data.eval_splits", d.eval_splits),
    ):
        for name in names:
            if name not in splits:
                _fail(field, name, f"{d.name} has splits {list(splits)}")


def _check_data(config: ml_collections.ConfigDict) -> None:
    d = config.data
    if d.name == "synthetic":
        for field in ("num_sequences", "length", "vocab_size"):
            _positive_int(config, f"data.{field}")
        return
    if d.name == swda.NAME:
        if config.model.get("kind", "vae") != "cvae":
            _fail("model.kind", config.model.get("kind", "vae"), "dialogs need 'cvae'")
        for field in ("window", "max_utt_len", "max_vocab"):
            _positive_int(config, f"data.{field}")
        _check_splits(d, swda.SPLITS)
        batching.check_buckets(d.bucket_lengths, 0)
        swda.check_source_dirs(*swda.source_dirs(d.data_dir or None))
        return
    if d.name not in text.CORPORA:
        allowed = ["synthetic", swda.NAME, *sorted(text.CORPORA)]
        _fail("data.name", d.name, f"must be one of {allowed}")
    _positive_int(config, "data.max_length")
    batching.batch_composition(d)
    _check_splits(d, sorted(text.get_spec(d.name).splits))
    batching.check_buckets(d.bucket_lengths, 0)
    text.check_source_dir(d.name, batching.data_root(config))


# --- Fields that are references ------------------------------------------------------------


def _reference_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list:
    """(path, FieldReference) of every field of ``config`` held as a reference."""
    found = []
    for key, value in config._fields.items():  # noqa: SLF001  (the references themselves)
        if isinstance(value, ml_collections.ConfigDict):
            found += _reference_fields(value, f"{prefix}{key}.")
        elif isinstance(value, ml_collections.FieldReference):
            found.append((f"{prefix}{key}", value))
    return found


def _root(ref: ml_collections.FieldReference) -> ml_collections.FieldReference:
    while isinstance(ref._value, ml_collections.FieldReference):  # noqa: SLF001
        ref = ref._value  # noqa: SLF001  (a derived reference: its parent)
    return ref


def references(config: ml_collections.ConfigDict) -> dict[str, str]:
    """``{field: what it follows}`` for the fields whose value is another field's (an
    ml_collections reference, e.g. ``beta_schedule.total_steps`` following
    ``num_train_steps``): the owner is the shallowest field holding the reference itself."""
    fields = _reference_fields(config)
    owners: dict[int, str] = {}
    for path, ref in sorted(fields, key=lambda f: (f[0].count("."), f[0])):
        if ref is _root(ref):
            owners.setdefault(id(ref), path)
    out = {}
    for path, ref in fields:
        owner = owners.get(id(_root(ref)))
        if owner is None or owner == path:
            continue
        ops = " ".join(f"{op.fn.__name__} {op.args}" for op in ref._ops)  # noqa: SLF001
        out[path] = owner + (f" ({ops})" if ops else "")
    return out


def check_reference_overrides(
    config: ml_collections.ConfigDict, overridden: dict[str, object]
) -> None:
    """Refuses ``--config.<field>`` overrides that cannot do what they say: a field holding
    the very reference another field holds (setting either sets both; a derived one, e.g.
    ``num_train_steps // 4``, is detached by its override and is fine)."""
    groups: dict[int, list[str]] = {}
    for path, ref in _reference_fields(config):
        groups.setdefault(id(ref), []).append(path)
    for paths in groups.values():
        if len(paths) < 2:
            continue
        set_ = [p for p in sorted(paths) if p in overridden]
        values = {repr(overridden[p]) for p in set_}
        if set_ and (len(set_) < len(paths) or len(values) > 1):
            raise ValueError(
                f"--config.{set_[0]}: config.{' and config.'.join(sorted(paths))} are one "
                "reference in the config file, so setting one sets the others; set them all "
                "to one value, or make the config file derive one from the other."
            )
