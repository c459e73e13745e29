"""The names every store and every reader shares, in one torch-free module that `analysis/` imports too: the tag
that says what made a run and its values, the tags a run of each kind carries, the metric vocabulary and the name of
a study's label-efficiency experiment. A tag or key written here is read back under the same name everywhere."""
import hashlib
import os
import re
import socket
from collections import Counter

# `fine_tune.role`: what made a run. A study's tree holds one `study` parent (and one `confirm` parent) with `trial`
# and `rerun` children; `make train` runs are `train`, `make rerun` makes `reproduction`s, `make curve` `curve` runs.
ROLE = "fine_tune.role"
STUDY, CONFIRM, TRIAL, RERUN, TRAIN, REPRODUCTION, CURVE = ("study", "confirm", "trial", "rerun", "train",
                                                            "reproduction", "curve")
TRAINING_ROLES = (TRIAL, RERUN, TRAIN, CURVE, REPRODUCTION)  # the runs that trained a model (make rerun takes them)

# What a run is (a re-run's trial and seed, a curve run's arm and budget) and how it ended.
RERUN_OF, SEED, VARY, WORKER = "fine_tune.rerun_of", "fine_tune.seed", "fine_tune.vary", "fine_tune.worker"
ARM, BUDGET = "fine_tune.arm", "fine_tune.budget"
TUNED_BY = "fine_tune.tuned_by"  # a curve's fine-tuned runs: their hyperparameters and where they came from
REASON, OUTCOME, CHAMPION = "fine_tune.reason", "fine_tune.outcome", "fine_tune.champion"
BEST_EXACT = "fine_tune.best/"  # + "val/f1_macro"...: a run's best/val/* metrics as tags, every digit the UI can show
STUDY_NAME, TRIAL_NUMBER, TRIAL_STATE = "optuna.study_name", "optuna.trial_number", "optuna.trial_state"

# The metric vocabulary: MLflow keys, Optuna's objective and the report's columns.
# How a run fine-tunes, its `method` param (`config.Hyperparameters.method`): what the report groups trials by
METHODS = ("full", "partly frozen", "probe", "LoRA", "LP-FT", "LP-FT + LoRA")
SCORE = "val/f1_macro"  # what the report's figures compare runs by (the best epoch's value)
SUMMARY = ("val/accuracy", "val/f1_macro", "test/accuracy", "test/f1_macro", "best_epoch", "epochs_run")


def role_filter(role: str) -> str:
    """An MLflow search filter for the runs of one role."""
    return f"tags.`{ROLE}` = '{role}'"


def curve_experiment(study: str) -> str:
    """The MLflow experiment that holds a study's label-efficiency curve (`make curve`)."""
    return f"{study}-curve"


def worker_id() -> str:
    """host:pid of this process, the value of the WORKER tag: who runs a trial, a re-run or a registration."""
    return f"{socket.gethostname()}:{os.getpid()}"


MAX_KEY = 250  # MLflow's limit on a metric key


def metric_keys(prefix: str, names: list[str]) -> dict[str, str]:
    """A valid MLflow metric key under `prefix` for each name, no two alike: characters MLflow refuses become '_'
    ('T-shirt/top', 'T-shirt (top)', '+', an emoji), long names are cut, and a name whose key would meet another's
    gets a hash of the name appended (a name that is already a valid key keeps it)."""
    room = MAX_KEY - len(prefix)
    clean = {n: (re.sub(r"[^\w.\- ]", "_", n) if n not in (".", "..") else "_")[:room] for n in names}
    keys = dict(clean)
    for digits in (8, 16, 64):  # longer hashes only if a key still meets another (a name shaped like a hashed key)
        seen = Counter(keys.values())
        clashing = [n for n in names if seen[keys[n]] > 1 and keys[n] != n]
        for n in clashing:
            keys[n] = f"{clean[n][:room - digits - 1]}-{hashlib.sha256(n.encode()).hexdigest()[:digits]}"
    return {n: prefix + k for n, k in keys.items()}
