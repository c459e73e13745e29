"""The search space drives everything a sweep varies: what Optuna samples, the grid, and which values are refused."""
import random

import optuna
import pytest

from fine_tune.config import Config, Hyperparameters, SearchSpace
from fine_tune.errors import ConfigError
from fine_tune.experiment import load_config
from fine_tune.study.samplers import CompleteTrialsOnce, grid, make_sampler, suggest


def space(**dims) -> SearchSpace:
    return Config(search=dims).search


def test_every_hyperparameter_is_searchable_as_a_range_or_choices():
    """The space is derived from the hyperparameters: each takes choices, each number takes a range too."""
    assert list(SearchSpace.model_fields) == list(Hyperparameters.model_fields)
    s = space(lr={"low": 1e-4, "high": 1e-1, "log": True}, frozen_layers={"low": 0, "high": 2}, head_size=[0, 32],
              weight_decay=[0.0, 1e-4], epochs={"low": 5, "high": 30}, patience=[3, 8])
    assert list(s.dimensions()) == ["lr", "frozen_layers", "head_size", "weight_decay", "epochs", "patience"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = suggest(study.ask(), Config(search=s))
        assert 1e-4 <= params["lr"] <= 1e-1 and params["frozen_layers"] in (0, 1, 2)
        assert params["head_size"] in (0, 32) and params["weight_decay"] in (0.0, 1e-4)
        assert 5 <= params["epochs"] <= 30 and params["patience"] in (3, 8)
        Config.model_validate({**Config().model_dump(), **params})  # every sample is a valid run


def test_grid_points():
    g = grid(space(lr={"low": 1e-4, "high": 1e-0, "log": True}, frozen_layers={"low": 0, "high": 2},
                   head_size=[0, 32, 64], epochs={"low": 5, "high": 30}))
    assert g["lr"] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert g["frozen_layers"] == [0, 1, 2] and g["head_size"] == [0, 32, 64]
    assert g["epochs"] == [5, 11, 18, 24, 30]  # a long integer range: five evenly spaced points
    cfg = Config(search={"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "head_size": [0, 16]},
                 sweep={"sampler": "grid"})
    sampler = make_sampler(cfg)
    study = optuna.create_study(sampler=sampler)
    seen = []
    study.optimize(lambda trial: seen.append(tuple(sorted(suggest(trial, cfg).items()))) or 0.0)
    assert len(seen) == len(set(seen)) == 10  # every grid point once, then the sampler stops: 5 lr x 2 heads


@pytest.mark.parametrize("text,message", [
    ("search: {head_size: [-1, 16]}", "search.head_size: -1 is not a value `head_size` accepts"),
    ("search: {head_size: [true, 16]}", "search.head_size: True is not a value `head_size` accepts"),
    ("search: {lr: {low: 0, high: 0.1}}", "search.lr: 0.0 is not a value `lr` accepts"),
    ("search: {lr: {low: 0.1, high: 0.01}}", "search.lr: low (0.1) is above high (0.01); swap them"),
    ("search: {batch_size: [0.5, 64]}", "search.batch_size: 0.5 is not a value `batch_size` accepts"),
    ("search: {head_size: [16, 16]}", "search.head_size: the choices repeat"),
    ("search: {learning_rate: [0.1]}", "search.learning_rate: unknown key"),
])
def test_values_no_run_accepts_are_refused_up_front(tmp_path, text, message):
    (tmp_path / "e.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(tmp_path / "e.yaml")


def test_median_pruner_decides_as_optunas_own_reading_complete_trials_only_when_they_change(tmp_path):
    """At every epoch, CompleteTrialsOnce answers as MedianPruner does, also when another worker completes a trial
    in the middle of one (a second study object on the same SQLite storage plays that worker); it reads the
    complete trials once per completion instead of once per epoch. Pure unit test: random intermediate values."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    wrapped = CompleteTrialsOnce(optuna.pruners.MedianPruner(3, 2))
    study = optuna.create_study(storage=url, direction="maximize", pruner=wrapped)
    other = optuna.load_study(study_name=study.study_name, storage=url)  # the other worker
    plain = optuna.pruners.MedianPruner(3, 2)
    reads = []
    get_trials = study.get_trials
    study.get_trials = lambda deepcopy=True, states=None: reads.append(states) or get_trials(deepcopy, states)
    rng, decisions = random.Random(0), []
    for n in range(12):
        trial = study.ask()
        for epoch in range(10):
            trial.report(rng.random(), epoch)
            if epoch == 5 and n % 3 == 0:
                t = other.ask()
                for e in range(10):
                    t.report(rng.random(), e)
                other.tell(t, rng.random())
            frozen = study._storage.get_trial(trial._trial_id)
            expected = plain.prune(other, frozen)
            assert wrapped.prune(study, frozen) == expected, (n, epoch)
            decisions.append(expected)
        study.tell(trial, rng.random())
    assert any(decisions) and not all(decisions)  # both answers were exercised
    assert 0 < len(reads) <= 12 + 4 + 1  # once per completion seen (ours and the other worker's), not per epoch


