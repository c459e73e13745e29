"""Re-train a study's top trials with new seeds, so a report can tell a real win from seed noise.

Each re-run is another child run of the study's MLflow parent, tagged `fine_tune.role=rerun`,
`fine_tune.rerun_of=<trial>`, `fine_tune.seed` and `fine_tune.worker` (host:pid), named `{study}/t{NNN}/s{seed}`,
with the same params a trial logs. Re-runs already finished in MLflow are skipped, so `make confirm` can be repeated
or interrupted safely; re-runs a killed `make confirm` on this machine left RUNNING are closed FAILED by the next one.
"""
from __future__ import annotations

import os
import socket
from typing import Callable

import optuna
from optuna.trial import TrialState

from fine_tune.config import Config
from fine_tune.errors import ConfigError
from fine_tune.learn.pretrain import backbone_for
from fine_tune.learn.train import Result, train
from fine_tune.names import CONFIRM, RERUN, RERUN_OF, ROLE, SEED, VARY, WORKER, role_filter, worker_id
from fine_tune.study.inputs import Inputs, backbone_of, resolve_inputs, run_params, run_record
from fine_tune.study.preflight import preflight
from fine_tune.track.stores import existing_study, optuna_url
from fine_tune.track.tracking import close_run, train_in_run
from fine_tune.track.tree import StudyTracker, parent_run


def confirm(cfg: Config, top_k: int = 3, seeds: int = 3, log: Callable[[str], None] = print,
            vary: str = "seed") -> int:
    """Re-train the `top_k` best complete trials with `seeds` new seeds each; return how many runs were added.
    `vary="backbone"` also pretrains the backbone again with each seed (`pretrain.seed`), so the spread includes the
    pretraining's noise."""
    if vary == "backbone" and cfg.pretrain is None:
        raise ConfigError("confirm --vary backbone pretrains the backbone again per seed; the experiment has no "
                          "`pretrain:` section")
    uri, url = preflight(cfg), optuna_url(cfg.runs_dir, cfg.sweep.storage)
    study = existing_study(cfg.study, url)
    if study is None:
        raise ConfigError(f"study {cfg.study!r} does not exist in {url}; run `make sweep` first")
    top = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)[:top_k]
    if not top:
        raise ConfigError(f"study {cfg.study!r} has no complete trials; run `make sweep` first")
    inputs = resolve_inputs(cfg, log)
    added = 0
    with parent_run(cfg.study, uri, verb="confirm", role=CONFIRM) as tracker:
        reruns = tracker.client.search_runs([tracker.experiment_id], role_filter(RERUN), max_results=10000)
        close_orphans(tracker, reruns, log)
        done = {(r.data.tags.get(RERUN_OF), r.data.tags.get(SEED)) for r in reruns if r.info.status == "FINISHED"}
        for t in top:
            for seed in range(cfg.seed + 1, cfg.seed + 1 + seeds):  # new seeds, never the trial's own (a replay)
                if (str(t.number), str(seed)) in done:
                    continue
                result = rerun(inputs, tracker, t, seed, vary, log)
                if result is not None:
                    added += 1
                    log(f"trial {t.number} seed {seed}: val/f1_macro {result.metrics['val/f1_macro']:.4f}, "
                        f"test/accuracy {result.metrics['test/accuracy']:.4f}, test/f1_macro "
                        f"{result.metrics['test/f1_macro']:.4f}")
    return added


def close_orphans(tracker: StudyTracker, reruns: list, log: Callable[[str], None]) -> None:
    """Close the RUNNING re-runs of a `make confirm` on this machine that ended without closing them (SIGKILL, out
    of memory): re-runs have no heartbeat, so their process is asked directly. Those of another machine, or of a
    process still alive, are left alone."""
    for r in reruns:
        host, _, pid = r.data.tags.get(WORKER, "").rpartition(":")
        if r.info.status != "RUNNING" or host != socket.gethostname():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: another confirm is running it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        close_run(tracker.uri, r.info.run_id, "FAILED", "FAIL",
                  f"its `make confirm` (pid {pid}) ended without closing it; re-run again by this confirm")
        log(f"closed re-run {r.info.run_name}: its `make confirm` (pid {pid}) had ended without closing it")


def rerun(inputs: Inputs, tracker: StudyTracker, trial: optuna.trial.FrozenTrial, seed: int, vary: str = "seed",
          log: Callable[[str], None] = print) -> Result | None:
    """One seed re-run of `trial` as a child run of the study; its result, or None if it diverged. Whatever stops it
    (an error, Ctrl-C), its run is closed, never left RUNNING."""
    fields = {**inputs.cfg.model_dump(), **trial.params, "seed": seed}
    if vary == "backbone":
        fields["pretrain"] = {**fields["pretrain"], "seed": seed}
    run_cfg = Config.model_validate(fields)
    splits, backbone = inputs.for_run(run_cfg)
    if vary == "backbone":
        backbone = backbone_for(run_cfg, log)
    tags = {ROLE: RERUN, RERUN_OF: str(trial.number), SEED: str(seed), WORKER: worker_id(), VARY: vary}
    params, record = run_params(run_cfg, splits, backbone_of(backbone)), run_record(run_cfg, splits)
    result, _ = train_in_run(lambda: tracker.start_run(f"t{trial.number:03d}/s{seed}", tags, params, record),
                             lambda run: train(run_cfg, splits, backbone, tracker=run))
    return result if result.status == "finished" else None
