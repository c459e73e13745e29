"""Re-train a study's top trials with new seeds, so a report can tell a real win from seed noise.

Each re-run is another child run of the study's MLflow parent, tagged `fine_tune.role=rerun`,
`fine_tune.rerun_of=<trial>` and `fine_tune.seed`, named `{study}/t{NNN}/s{seed}`. Re-runs already in MLflow are
skipped, so `make confirm` can be repeated or interrupted safely.
"""
from __future__ import annotations

from typing import Callable

import optuna
from optuna.trial import TrialState

from fine_tune.config import Config, ConfigError
from fine_tune.data import splits_for
from fine_tune.pretrain import backbone_for
from fine_tune.sweep import context_params, interruptible, storage_url, study_storage
from fine_tune.tracking import PARENT_TAG, StudyTracker, check_reachable, default_uri, shielded
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
    tracker = StudyTracker(cfg.study, cfg.runs_dir)
    done = {(r.data.tags.get("fine_tune.rerun_of"), r.data.tags.get("fine_tune.seed"))
            for r in tracker.client.search_runs([tracker.experiment_id], f"tags.`{PARENT_TAG}` = 'rerun'",
                                                max_results=10000)
            if r.info.status == "FINISHED"}
    context = context_params(cfg, splits, backbone)
    added, status = 0, "KILLED"
    try:
        with interruptible():  # Ctrl-C / SIGTERM: never inside a store write; the re-run in progress is closed
            for t in top:
                # new seeds, never the trial's own (which would only replay it)
                for seed in range(cfg.seed + 1, cfg.seed + 1 + seeds):
                    if (str(t.number), str(seed)) in done:
                        continue
                    run_cfg = Config.model_validate({**cfg.model_dump(), **t.params, "seed": seed})
                    run = None
                    try:  # everything that creates, feeds or closes the run: whatever stops it, it never stays RUNNING
                        with shielded():  # the run and our handle on it appear together (a Ctrl-C waits for both)
                            run = tracker.start_run(f"{cfg.study}/t{t.number:03d}/s{seed}",
                                                    {PARENT_TAG: "rerun", "fine_tune.rerun_of": str(t.number),
                                                     "fine_tune.seed": str(seed)},
                                                    {**context, **t.params, "seed": seed,
                                                     "trainable_params": t.user_attrs.get("trainable_params")})
                        result = train(run_cfg, splits, backbone, tracker=run)
                        if result.status != "finished":
                            run.end("FAILED", "FAIL", result.message)
                            continue
                        run.log_result(result)
                        run.end("FINISHED", "COMPLETE")
                    except BaseException as e:
                        if run is not None:
                            run.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", "FAIL", repr(e))
                        raise
                    added += 1
                    log(f"trial {t.number} seed {seed}: val/f1_macro {result.metrics['val/f1_macro']:.4f}, "
                        f"test/accuracy {result.metrics['test/accuracy']:.4f}, test/f1_macro "
                        f"{result.metrics['test/f1_macro']:.4f}")
            status = "FINISHED"
    finally:
        tracker.close(status)
    return added
