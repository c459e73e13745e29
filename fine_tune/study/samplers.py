"""The search space as Optuna sees it: sampling, the grid, the sampler and the pruner.

Every searched hyperparameter is a field of `config.Hyperparameters`; its dimension (a range or choices) knows how
to be sampled and gridded, so nothing here names a hyperparameter.
"""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from fine_tune.config import Config, Hyperparameters, SearchSpace, applies
from fine_tune.errors import ConfigError
from fine_tune.track.stores import trial_counts


def suggest(trial: optuna.Trial, cfg: Config) -> dict[str, Any]:
    """Every hyperparameter of a trial: sampled when named in `search:`, else the config's value; one that does not
    apply given those before it (LoRA on a probe) is not sampled and gets its off value."""
    values, dims = cfg.model_dump(include=set(Hyperparameters.model_fields)), cfg.search.dimensions()
    for name, field in Hyperparameters.model_fields.items():  # in definition order: what a rule reads comes first
        if not applies(name, values):
            values[name] = field.default
        elif name in dims:
            values[name] = dims[name].suggest(trial, name)
    return values


class _Distributions:
    """A stand-in trial whose suggest_* calls return the distribution Optuna records for them, sampling nothing."""

    def suggest_float(self, name: str, low: float, high: float, log: bool = False):
        return optuna.distributions.FloatDistribution(low, high, log=log)

    def suggest_int(self, name: str, low: int, high: int):
        return optuna.distributions.IntDistribution(low, high)

    def suggest_categorical(self, name: str, choices: list):
        return optuna.distributions.CategoricalDistribution(choices)


def _shown(d: optuna.distributions.BaseDistribution) -> str:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return f"the choices {list(d.choices)}"
    kind = "an integer" if isinstance(d, optuna.distributions.IntDistribution) else "a log-scale" if d.log else "a"
    return f"{kind} range [{d.low:g}, {d.high:g}]"


def check_space(study: optuna.Study, cfg: Config) -> None:
    """Optuna cannot change a hyperparameter's list of choices, its kind or its log scale within a study (each new
    trial would fail on it): such a change is refused before anything runs, naming the two ways out. A range may
    widen or narrow."""
    recorded = {}
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            recorded.setdefault(name, dist)
    for name, dim in cfg.search.dimensions().items():
        old, new = recorded.get(name), dim.suggest(_Distributions(), name)
        try:
            if old is not None:
                optuna.distributions.check_distribution_compatibility(old, new)
        except ValueError:
            raise ConfigError(f"search.{name}: study {cfg.study} has trials with {_shown(old)}, and Optuna cannot "
                              f"change that to {_shown(new)} within a study; keep {_shown(old)}, or give the new "
                              f"search a new study name (`study:`)") from None


def grid(space: SearchSpace) -> dict[str, list]:
    """The points a grid sampler visits: choices as given, ranges at a few evenly (or log-) spaced points."""
    return {name: dim.grid() for name, dim in space.dimensions().items()}


def make_sampler(cfg: Config, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    """A seeded sampler; a resumed study offsets the seed so it does not replay the first run's samples."""
    seed = cfg.seed + trials_so_far
    if cfg.sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sweep.sampler == "grid":
        return optuna.samplers.GridSampler(grid(cfg.search), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    s = cfg.sweep
    return {"median": lambda: CompleteTrialsOnce(optuna.pruners.MedianPruner(s.prune_startup_trials,
                                                                             s.prune_warmup_epochs)),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=2),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=2, max_resource=cfg.epochs),
            "none": optuna.pruners.NopPruner}[cfg.sweep.pruner]()


class CompleteTrialsOnce(optuna.pruners.BasePruner):
    """Optuna's median pruner, reading the study's complete trials only when their number changed.

    MedianPruner reads every complete trial at every epoch of every trial: ~3 ms per epoch, a third of a transfer
    trial's epoch. Between two completions the answer is the same, so this keeps the list and asks the database
    only for a count (one COUNT query); a trial completed by another worker is seen at the next epoch, as before.
    The decisions are the median pruner's own (tests/test_search.py checks them against it).
    """

    def __init__(self, pruner: optuna.pruners.BasePruner):
        self.pruner, self.count, self.complete = pruner, None, []

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        count = trial_counts(study)[TrialState.COMPLETE]
        if count != self.count:
            self.count, self.complete = count, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return self.pruner.prune(_WithCompleteTrials(study, self.complete), trial)


class _WithCompleteTrials:
    """The study as a pruner sees it, answering "the complete trials" from a list in hand."""

    def __init__(self, study: optuna.Study, complete: list):
        self._study, self._complete = study, complete

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        if not deepcopy and states is not None and tuple(states) == (TrialState.COMPLETE,):
            return self._complete
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str):
        return getattr(self._study, name)
