"""Early stopping by validation −ELBO, the rule of Zhao et al.'s dialog code (NeuralDialog-CVAE,
kept by Fu et al.'s ``dialog/kgcvae_swda_cyc.py``).

After the v-th validation (v = 1, 2, …) with loss L_v = −ELBO on the valid split (β = 1):

    if L_v < best:                                   a new best (``best/`` keeps it)
        if L_v ≤ threshold · improve_threshold:      a real improvement
            patience  = max(patience, v · patience_increase)
            threshold = L_v
        best = L_v
    stop once patience ≤ v

with patience = ``patience`` and threshold = best = ∞ at the start (the official 10, 0.996 and
2). The state is a function of the validation history alone, so a resumed run replays it from
``metrics.jsonl`` and stops where an uninterrupted one stops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import ml_collections

# The validation record's field: −ELBO is −(valid_elbo), per sequence.
VALID_ELBO = "valid_elbo"


class State(NamedTuple):
    patience: float  # in validations
    threshold: float
    best: float
    validations: int = 0

    @property
    def stopped(self) -> bool:
        return self.patience <= self.validations


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.early_stopping`` is on (``patience`` > 0; absent: off)."""
    rule = config.get("early_stopping")
    return rule is not None and rule.patience > 0


def init(config: ml_collections.ConfigDict) -> State:
    return State(float(config.early_stopping.patience), math.inf, math.inf)


def update(state: State, loss: float, config: ml_collections.ConfigDict) -> State:
    """The state after one more validation whose −ELBO is ``loss`` (module docstring)."""
    rule = config.early_stopping
    v = state.validations + 1
    patience, threshold, best = state.patience, state.threshold, state.best
    if loss < best:
        if loss <= threshold * rule.improve_threshold:
            patience = max(patience, v * rule.patience_increase)
            threshold = loss
        best = loss
    return State(patience, threshold, best, v)


def replay(records: Iterable[dict], config: ml_collections.ConfigDict) -> State:
    """The state after the validations logged in ``records`` (`writers.read_metrics`)."""
    state = init(config)
    for record in records:
        if VALID_ELBO in record:
            state = update(state, -record[VALID_ELBO], config)
    return state
