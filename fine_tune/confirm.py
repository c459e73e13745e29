"""Re-train a study's top trials with new seeds, so a report can tell a real win from seed noise.

Each re-run is another child run of the study's MLflow parent, tagged `fine_tune.role=rerun`,
`fine_tune.rerun_of=<trial>`, `fine_tune.seed` and `fine_tune.worker` (host:pid), named `{study}/t{NNN}/s{seed}`.
Re-runs already finished in MLflow are skipped, so `make confirm` can be repeated or interrupted safely; re-runs a
killed `make confirm` on this machine left RUNNING are closed FAILED by the next one.
"""
from __future__ import annotations

import os
import socket
from typing import Callable

import optuna
from optuna.trial import TrialState

from fine_tune.config import Config, ConfigError
from fine_tune.data import splits_for
from fine_tune.pretrain import backbone_for
from fine_tune.sweep import context_params, interruptible, storage_url, study_storage, worker_id
from fine_tune.tracking import PARENT_TAG, StudyTracker, check_reachable, close_run, default_uri, shielded
from fine_tune.train import train


def confirm(cfg: Config, top_k: int = 3, seeds: int = 3, log: Callable[[str], None] = print) -> int:
    """Re-train the `top_k` best complete trials with `seeds` new seeds each; return how many runs were added."""
    check_reachable(default_uri(cfg.runs_dir))
    try:
        study = optuna.load_study(study_name=cfg.study, storage=study_storage(cfg))
    except KeyError:
        raise ConfigError(f"study {cfg.study!r} does not exist in {storage_url(cfg)}; run `make sweep` first") from None
    top = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)[:top_k]
    if not top:
        raise ConfigError(f"study {cfg.study!r} has no complete trials; run `make sweep` first")
    splits, backbone = splits_for(cfg), backbone_for(cfg, log)
    context = context_params(cfg, splits, backbone)
    added, status = 0, "KILLED"
    # Ctrl-C / SIGTERM: never inside a store write; the re-run in progress and the parent run are closed
    with interruptible():
        tracker = StudyTracker(cfg.study, cfg.runs_dir)  # sets the parent run RUNNING: closed in `finally`
        try:
            reruns = tracker.client.search_runs([tracker.experiment_id], f"tags.`{PARENT_TAG}` = 'rerun'",
                                                max_results=10000)
            close_orphans(tracker, reruns, log)
            done = {(r.data.tags.get("fine_tune.rerun_of"), r.data.tags.get("fine_tune.seed"))
                    for r in reruns if r.info.status == "FINISHED"}
            for t in top:
                # new seeds, never the trial's own (which would only replay it)
                for seed in range(cfg.seed + 1, cfg.seed + 1 + seeds):
                    if (str(t.number), str(seed)) not in done:
                        result = rerun(cfg, tracker, t, seed, context, splits, backbone)
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


def rerun(cfg: Config, tracker: StudyTracker, trial: optuna.trial.FrozenTrial, seed: int, context: dict,
          splits, backbone: str | None):
    """One re-run as a child run of the study; its result, or None if it diverged. Whatever stops it (an error,
    Ctrl-C), its run is closed, never left RUNNING."""
    run_cfg = Config.model_validate({**cfg.model_dump(), **trial.params, "seed": seed})
    run = None
    try:
        with shielded():  # the run and our handle on it appear together (a Ctrl-C waits for both)
            run = tracker.start_run(f"{cfg.study}/t{trial.number:03d}/s{seed}",
                                    {PARENT_TAG: "rerun", "fine_tune.rerun_of": str(trial.number),
                                     "fine_tune.seed": str(seed), "fine_tune.worker": worker_id()},
                                    {**context, **trial.params, "seed": seed,
                                     "trainable_params": trial.user_attrs.get("trainable_params")})
        result = train(run_cfg, splits, backbone, tracker=run)
        if result.status == "finished":
            run.log_result(result)
        with shielded():  # a Ctrl-C during the end waits until the run is marked closed, so it is not closed twice
            if result.status == "finished":
                run.end("FINISHED", "COMPLETE")
            else:
                run.end("FAILED", "FAIL", result.message)
            run = None
    except BaseException as e:
        if run is not None:
            run.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", "FAIL", repr(e))
        raise
    return result if result.status == "finished" else None
