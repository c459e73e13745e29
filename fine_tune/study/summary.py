"""What a study says, in words and tables: its definition (the parent run's params), the parent run's description,
the counts and best trial (the parent's summary) and the console table of the best trials."""
from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.trial import TrialState

from fine_tune.config import Config


def definition(cfg: Config, n_trials: int | None) -> dict[str, Any]:
    """The study as a person would define it, for the parent run's params."""
    s = cfg.sweep
    pruner = {"median": f"median (startup {s.prune_startup_trials} trials, warm-up {s.prune_warmup_epochs} epochs)",
              "halving": "successive halving (min resource 2)", "hyperband": f"hyperband (2-{cfg.epochs} epochs)",
              "none": "none"}[s.pruner]
    return {"study": cfg.study, "objective": f"maximize {s.objective}", "sampler": f"{s.sampler} (seed {cfg.seed})",
            "pruner": pruner, "n_trials": n_trials or s.n_trials, "seed": cfg.seed, "model": cfg.model,
            **{f"search.{name}": json.dumps(dim.model_dump()) for name, dim in cfg.search.dimensions().items()}}


def description(study: optuna.Study, cfg: Config, view: str | None = None, top: int = 5) -> str:
    """The parent run's description: the counts, a link to `view` (every trial, `track.views`), the best trials as a
    Markdown table, the champion, the report."""
    s = summary(study)
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    rows = [f"| trial | {' | '.join(names)} | {cfg.sweep.objective} | test/accuracy | run |",
            "|" + "---|" * (len(names) + 4)]
    for t in trials[:top]:
        values = [f"{t.params[k]:.3g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, "-"))
                  for k in names]
        rows.append(f"| {t.number} | {' | '.join(values)} | {t.value:.4f} | "
                    f"{t.user_attrs.get('test/accuracy', float('nan')):.4f} | `{t.user_attrs.get('mlflow_run_id')}` |")
    champion = study.user_attrs.get("champion_trial")
    return "\n".join([
        f"**{cfg.study}**: {s['trials_complete']} complete, {s['trials_pruned']} pruned, {s['trials_failed']} failed "
        f"trials; objective: maximize `{cfg.sweep.objective}` (validation; the test set never drives a decision)."
        + (f" [Every trial, best first]({view}) (pruned ones by the best epoch they reached)." if view else ""), "",
        *rows, "",
        (f"**Champion**: trial {champion}, `models:/{cfg.study}@champion`." if champion is not None else
         "No champion yet."),
        f"**Report**: `make report` writes `reports/{cfg.study}/report.html` and logs it to this run's artifacts "
        "under `report/report.html` (open it there)."])


def best_of(trials: list) -> optuna.trial.FrozenTrial:
    """The best complete trial of a list in hand (the study maximises; ties go to the earliest): study.best_trial
    would read it from the storage and deep-copy it again."""
    return max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))


def summary(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    out: dict[str, Any] = {"trials_complete": count[TrialState.COMPLETE], "trials_pruned": count[TrialState.PRUNED],
                           "trials_failed": count[TrialState.FAIL]}
    if count[TrialState.COMPLETE]:
        best = best_of(trials)
        out |= {"best_value": best.value, "best_trial": best.number,
                **{f"best_{k}": v for k, v in best.params.items()}}
    return out


def _cell(value: Any, distribution, width: int) -> str:
    if value is None:
        return f"{'-':>{width}s}"
    if isinstance(value, float):
        return f"{value:>{width}.2e}" if getattr(distribution, "log", False) else f"{value:>{width}.4g}"
    return f"{value!s:>{width}s}"


def top_table(study: optuna.Study, k: int = 10) -> str:
    """The best finished trials first, then pruned and failed ones, with every searched hyperparameter; pruned
    trials show their last reported value."""
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]

    def shown(t: optuna.trial.FrozenTrial) -> float | None:
        if t.state == TrialState.PRUNED and t.intermediate_values:
            return t.intermediate_values[t.last_step]
        return t.value

    trials.sort(key=lambda t: (t.state != TrialState.COMPLETE, -(shown(t) or -1.0)))
    best = best_of(trials).number if any(t.state == TrialState.COMPLETE for t in trials) else None
    distributions = {name: d for t in reversed(trials) for name, d in t.distributions.items()}
    names = list(dict.fromkeys(name for t in trials for name in t.distributions))
    widths = [max(9, len(n)) for n in names]
    head = f"{'trial':>5s} " + " ".join(f"{n:>{w}s}" for n, w in zip(names, widths)) + f" {'val F1':>7s} {'val acc':>7s}  state"
    rows = [head, "-" * len(head)]
    for t in trials[:k]:
        f1, acc = t.user_attrs.get("val/f1_macro", shown(t)), t.user_attrs.get("val/accuracy")
        rows.append(f"{t.number:5d} " + " ".join(_cell(t.params.get(n), distributions[n], w) for n, w in zip(names, widths))
                    + f" {'-' if f1 is None else format(f1, '.4f'):>7s} {'-' if acc is None else format(acc, '.4f'):>7s}"
                    + f"  {t.state.name}" + ("  <- best, champion" if t.number == best else ""))
    return "\n".join(rows)
