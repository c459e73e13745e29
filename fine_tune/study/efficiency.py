"""Label efficiency: test accuracy against labeled images per class, for three ways of using the same architecture -
the pretrained backbone fine-tuned (with the study's best hyperparameters when the study has them), the same model
trained from scratch, and a linear probe of the frozen pretrained backbone - each budget and arm over several seeds.

Every run is a child run of the MLflow experiment `<study>-curve`, tagged `fine_tune.role=curve`, `fine_tune.arm`,
`fine_tune.budget`, `fine_tune.seed`; runs already finished are skipped, so `make curve` resumes. `python -m analysis
curve` turns them into the plot and the table.
"""
from __future__ import annotations

from typing import Callable

from optuna.trial import TrialState

from fine_tune import archs
from fine_tune.config import Config, Hyperparameters, resolved
from fine_tune.errors import ConfigError
from fine_tune.learn.data import splits_for
from fine_tune.learn.pretrain import backbone_for
from fine_tune.learn.train import Result, train
from fine_tune.names import ARM, BUDGET, CURVE, ROLE, SEED, TUNED_BY, curve_experiment, role_filter
from fine_tune.study.inputs import backbone_of, run_params, run_record
from fine_tune.study.preflight import preflight
from fine_tune.track.stores import existing_study, optuna_url
from fine_tune.track.tracking import train_in_run
from fine_tune.track.tree import StudyTracker, parent_run


def study_best(cfg: Config, method: str | None = None):
    """The best complete trial of the study `cfg.study` (of those that fine-tuned by `method`, when given), or None
    when there is none yet."""
    study = existing_study(cfg.study, optuna_url(cfg.runs_dir, cfg.sweep.storage))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study else []
    if method is not None:
        complete = [t for t in complete if trial_method(cfg, t.params) == method]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def trial_method(cfg: Config, params: dict) -> str:
    """How a trial with these sampled `params` fine-tuned (the hyperparameters it did not sample are the config's)."""
    values = resolved({**cfg.model_dump(include=set(Hyperparameters.model_fields)), **params})
    return Hyperparameters.model_validate(values).method()


def tuning(cfg: Config, arm: str = "fine-tuned") -> tuple[dict, str]:
    """An arm's hyperparameters (fine-tuned: the study's best trial's, else the experiment's own; a method: the
    study's best trial of that method; the architecture stays the experiment's), and a line saying which and where
    they came from: the runs' TUNED_BY tag, which the curve's report quotes."""
    best = study_best(cfg, None if arm == "fine-tuned" else arm)
    if best is None and arm != "fine-tuned":
        raise ConfigError(f"curve.arms: study {cfg.study} has no complete {arm} trial to take the {arm} arm's "
                          f"hyperparameters from; search that way of fine-tuning first (`make sweep`) or drop the arm")
    params = {k: v for k, v in (best.params if best else {}).items() if k not in ("model", "image_size")}
    searched = cfg.search.dimensions() if cfg.search else ("lr", "frozen_layers", "head_size")
    shown = list(params) or [k for k in searched if k not in ("model", "image_size")]
    values = {k: params.get(k, getattr(cfg, k)) for k in shown}
    said = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    source = (f"the best {'' if arm == 'fine-tuned' else arm + ' '}trial ({best.number}) of study {cfg.study}" if best
              else f"the experiment's own: study {cfg.study} had no complete trial")
    return params, f"{said} ({source})"


def draw_seed(cfg: Config, seed: int) -> int:
    """The data seed of a curve run: its own seed, unless the target shares classes with pretraining; then every run
    draws from the images held out of pretraining in the experiment's own order (another order would reach images
    the backbone was pretrained on)."""
    shares = cfg.pretrain is not None and set(cfg.pretrain.classes) & set(cfg.classes or range(10**6))
    return cfg.data_seed if shares else seed


def arm_config(cfg: Config, arm: str, budget: int, seed: int, best: dict, n_train: int) -> Config:
    """One run of the curve: `budget` labels per class, trained with `seed` the way `arm` says (`best`: the arm's
    tuned hyperparameters). The batch is at most a quarter of the `n_train` labeled images, so the smallest budgets
    still take a few steps per epoch."""
    fields = {**cfg.model_dump(), **best, "budget_per_class": budget, "seed": seed, "data_seed": draw_seed(cfg, seed),
              "search": None, "pretrain": None, "pretrained": None, "weights": None}
    if arm == "from scratch":  # the whole network trained: nothing pretrained to adapt or to probe first
        fields |= {"frozen_layers": 0, "lora_rank": 0, "lp_epochs": 0}
    elif arm == "linear probe":
        fields |= {"frozen_layers": archs.stage_count(fields["model"]), "head_size": 0, "lr": cfg.curve.probe_lr}
    fields |= resolved({k: fields[k] for k in Hyperparameters.model_fields})  # as its trial trained
    fields["batch_size"] = min(fields["batch_size"], max(2, n_train // 4))
    return Config.model_validate(fields)


def check_curve(cfg: Config) -> None:
    """What a curve needs of the experiment, refused in one line before anything runs."""
    if cfg.pretrain is None and cfg.weights is None and cfg.pretrained is None and not archs.is_text(cfg.model):
        raise ConfigError("the curve compares a pretrained backbone with training from scratch; set pretrain:, "
                          "weights: or pretrained:")
    if draw_seed(cfg, -1) != -1 and max(cfg.curve.budgets) > cfg.pretrain.holdout_per_class:
        raise ConfigError(f"the target shares classes with pretraining, so each curve budget must fit in the "
                          f"{cfg.pretrain.holdout_per_class} images per class held out of it; raise "
                          f"pretrain.holdout_per_class to {max(cfg.curve.budgets)} or drop the larger budgets")


def run_curve(cfg: Config, log: Callable[[str], None] = print) -> int:
    """Train every (budget, arm, seed) run not yet finished; return how many were added."""
    check_curve(cfg)
    uri = preflight(cfg)
    arms = cfg.curve.arms
    tuned = {arm: tuning(cfg, arm) for arm in arms if arm not in ("from scratch", "linear probe")}
    if {"from scratch", "linear probe"} & set(arms) and "fine-tuned" not in tuned:
        tuned["fine-tuned"] = tuning(cfg)  # from scratch and the probe start from the fine-tuned arm's hyperparameters
    for arm, (_, tuned_by) in tuned.items():
        log(f"curve of {cfg.study}: {arm} arm with {tuned_by}")
    backbone = backbone_of(backbone_for(cfg, log))
    added = 0
    with parent_run(curve_experiment(cfg.study), uri, verb="curve") as tracker:
        done = {(r.data.tags.get(ARM), r.data.tags.get(BUDGET), r.data.tags.get(SEED))
                for r in tracker.client.search_runs([tracker.experiment_id], role_filter(CURVE), max_results=10000)
                if r.info.status == "FINISHED"}
        for budget in cfg.curve.budgets:
            for seed in range(cfg.curve.seeds):
                todo = [arm for arm in arms if (arm, str(budget), str(seed)) not in done]
                if not todo:
                    continue
                splits = splits_for(cfg.model_copy(update={"budget_per_class": budget,
                                                           "data_seed": draw_seed(cfg, seed)}))
                for arm in todo:
                    best, tuned_by = tuned.get(arm, tuned.get("fine-tuned", ({}, "")))
                    result = curve_run(tracker, cfg, arm, budget, seed, best, splits, backbone, tuned_by)
                    if result.status != "finished":
                        continue
                    added += 1
                    log(f"budget {budget:4d}  {arm:14s} seed {seed}: test/accuracy "
                        f"{result.metrics['test/accuracy']:.4f}  test/f1_macro {result.metrics['test/f1_macro']:.4f}"
                        f"  ({result.metrics['time/train_s']:.1f}s)")
    return added


def curve_run(tracker: StudyTracker, cfg: Config, arm: str, budget: int, seed: int, best: dict, splits,
              backbone: tuple, tuned_by: str = "") -> Result:
    """One (arm, budget, seed) point of the curve as a child run of the curve's parent."""
    run_cfg = arm_config(cfg, arm, budget, seed, best, len(splits.train))
    start = (None, None) if arm == "from scratch" else backbone
    tags = {ROLE: CURVE, ARM: arm, BUDGET: str(budget), SEED: str(seed),
            **({TUNED_BY: tuned_by[:5000]} if arm not in ("from scratch", "linear probe") and tuned_by else {})}
    params, record = run_params(run_cfg, splits, start), run_record(run_cfg, splits)
    result, _ = train_in_run(lambda: tracker.start_run(f"b{budget}/{arm}/s{seed}", tags, params, record),
                             lambda run: train(run_cfg, splits, start[0], tracker=run))
    return result
