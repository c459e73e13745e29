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

from fine_tune.config import Config, ConfigError
from fine_tune.interrupts import interruptible
from fine_tune.stores import check_reachable, optuna_storage, optuna_url, tracking_uri
from fine_tune.pretrain import backbone_for
from fine_tune.inputs import Inputs, resolve_inputs, single_inputs
from fine_tune.tracking import PARENT_TAG, StudyTracker, close_run, run_scope
from fine_tune.train import train
from fine_tune.workers import worker_id


def confirm(cfg: Config, top_k: int = 3, seeds: int = 3, log: Callable[[str], None] = print,
            vary: str = "seed") -> int:
    """Re-train the `top_k` best complete trials with `seeds` new seeds each; return how many runs were added.
    `vary="backbone"` also pretrains the backbone again with each seed (`pretrain.seed`), so the spread includes the
    pretraining's noise."""
    if vary == "backbone" and cfg.pretrain is None:
        raise ConfigError("confirm --vary backbone pretrains the backbone again per seed; the experiment has no "
                          "`pretrain:` section")
    uri, url = tracking_uri(cfg.runs_dir), optuna_url(cfg.runs_dir, cfg.sweep.storage)
    check_reachable(uri)
    try:
        study = optuna.load_study(study_name=cfg.study, storage=optuna_storage(url))
    except KeyError:
        raise ConfigError(f"study {cfg.study!r} does not exist in {url}; run `make sweep` first") from None
    top = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)[:top_k]
    if not top:
        raise ConfigError(f"study {cfg.study!r} has no complete trials; run `make sweep` first")
    inputs = resolve_inputs(cfg, log)
    added, status = 0, "KILLED"
    # Ctrl-C / SIGTERM: never inside a store write; the re-run in progress and the parent run are closed
    with interruptible():
        tracker = StudyTracker(cfg.study, uri, verb="confirm", role="confirm")  # RUNNING until `finally` closes it
        try:
            tracker.describe()
            reruns = tracker.client.search_runs([tracker.experiment_id], f"tags.`{PARENT_TAG}` = 'rerun'",
                                                max_results=10000)
            close_orphans(tracker, reruns, log)
            done = {(r.data.tags.get("fine_tune.rerun_of"), r.data.tags.get("fine_tune.seed"))
                    for r in reruns if r.info.status == "FINISHED"}
            for t in top:
                # new seeds, never the trial's own (which would only replay it)
                for seed in range(cfg.seed + 1, cfg.seed + 1 + seeds):
                    if (str(t.number), str(seed)) not in done:
                        result = rerun(inputs, tracker, t, seed, vary, log)
                        if result is not None:
                            added += 1
                            log(f"trial {t.number} seed {seed}: val/f1_macro {result.metrics['val/f1_macro']:.4f}, "
                                f"test/accuracy {result.metrics['test/accuracy']:.4f}, test/f1_macro "
                                f"{result.metrics['test/f1_macro']:.4f}")
            status = "FINISHED"
        finally:
            tracker.close(status)
    return added


def close_orphans(tracker: StudyTracker, reruns: list, log: Callable[[str], None]) -> None:
    """Close the RUNNING re-runs of a `make confirm` on this machine that ended without closing them (SIGKILL, out
    of memory): re-runs have no heartbeat, so their process is asked directly. Those of another machine, or of a
    process still alive, are left alone."""
    for r in reruns:
        host, _, pid = r.data.tags.get("fine_tune.worker", "").rpartition(":")
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
          log: Callable[[str], None] = print):
    """One re-run as a child run of the study; its result, or None if it diverged. Whatever stops it (an error,
    Ctrl-C), its run is closed, never left RUNNING."""
    cfg = inputs.cfg
    fields = {**cfg.model_dump(), **trial.params, "seed": seed}
    if vary == "backbone":
        fields["pretrain"] = {**fields["pretrain"], "seed": seed}
    run_cfg = Config.model_validate(fields)
    if vary == "backbone":
        splits, _ = inputs.for_run(run_cfg)
        inputs = single_inputs(run_cfg, splits, backbone_for(run_cfg, log))
    tags = {PARENT_TAG: "rerun", "fine_tune.rerun_of": str(trial.number), "fine_tune.seed": str(seed),
            "fine_tune.worker": worker_id(), "fine_tune.vary": vary}
    with run_scope(lambda: inputs.open_run(tracker, run_cfg, f"t{trial.number:03d}/s{seed}", tags)) as run:
        result = train(run_cfg, *inputs.for_run(run_cfg), tracker=run)
        if result.status != "finished":
            run.end("FAILED", "FAIL", result.message)
            return None
        run.log_result(result)
    return result
