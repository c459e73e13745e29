"""Single runs outside a sweep: `make train` (one fine-tuning, tracked in the study's experiment unless `--no-track`)
and `make rerun RUN=<id>` (rebuild a run from its logged config.yaml on this machine's paths, train it again, and say
whether the numbers are the same and, if not, what differs: the code, the tree, the environment, the data or the
backbone). What a rerun reads from a store is data: checked like a config, and never a place to write to.
"""
from __future__ import annotations

import glob
import math
import re
import tempfile
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from fine_tune.config import Config
from fine_tune.errors import CheckpointError, ConfigError
from fine_tune.experiment import load_config
from fine_tune.learn import checkpoints
from fine_tune.learn.data import Splits, splits_for
from fine_tune.learn.pretrain import backbone_for
from fine_tune.learn.train import NullTracker, Result, train
from fine_tune.names import REASON, REPRODUCTION, RERUN_OF, ROLE, TRAIN, TRAINING_ROLES
from fine_tune.study.inputs import backbone_of, run_params, run_record
from fine_tune.study.preflight import preflight
from fine_tune.track.interrupts import interruptible
from fine_tune.track.provenance import differences, download_config, log_provenance, logged_run
from fine_tune.track.stores import check_reachable, mlflow_client, tracking_uri
from fine_tune.track.tracking import experiment_id, open_run, train_in_run

COMPARED = (("val/accuracy", "best/val/accuracy"), ("val/f1_macro", "best/val/f1_macro"),
            ("test/accuracy", "test/accuracy"), ("test/f1_macro", "test/f1_macro"))


def tracked_train(cfg: Config, splits: Splits, backbone: str | None, tags: dict[str, str], verb: str, name: str,
                  on_epoch: Callable | None = None, experiment: str | None = None) -> tuple[Result, str]:
    """Train `cfg` as one run of the MLflow experiment `experiment` (default: the study's), not under a sweep's
    parent: params, provenance, config.yaml, dataset inputs, curves and the result. Returns the result and the run id."""
    client = mlflow_client(tracking_uri(cfg.runs_dir))
    params, record = run_params(cfg, splits, backbone_of(backbone)), run_record(cfg, splits)

    def trained(run):
        log_provenance(run, {})
        return train(cfg, splits, backbone, tracker=run, on_epoch=on_epoch)

    with interruptible():
        exp = experiment_id(client, experiment or cfg.study)
        result, run = train_in_run(lambda: open_run(client, exp, name, tags, params, verb, record=record), trained)
    return result, run.run_id


def train_once(cfg: Config, track: bool, on_epoch: Callable | None = None, log: Callable[[str], None] = print
               ) -> tuple[Result, str | None]:
    """`make train`: the backbone (first: a missing weights file fails before the data is read), the splits, then
    one run, tracked unless `track` is false."""
    preflight(cfg, track)
    backbone = backbone_for(cfg, log)
    splits = splits_for(cfg)
    log(f"{cfg.study}: {cfg.model} on classes {', '.join(splits.class_names)} | train {len(splits.train)} / val "
        f"{len(splits.val)} / test {len(splits.test)} {splits.unit} | backbone {backbone or 'none (from scratch)'} | frozen "
        f"{cfg.frozen_layers}, head {cfg.head_size}, lr {cfg.lr:g}")
    if not track:
        return train(cfg, splits, backbone, tracker=NullTracker(), on_epoch=on_epoch), None
    return tracked_train(cfg, splits, backbone, {ROLE: TRAIN}, "train", f"train/s{cfg.seed}", on_epoch)


# --- make rerun


def _finished_training_run(client, run_id: str, uri: str):
    """The run `run_id`, refused in one line unless a fine_tune training run that finished."""
    run = logged_run(client, run_id)
    if run is None:
        raise ConfigError(f"run {run_id} is not in {uri}; copy its id from the MLflow UI or point "
                          "MLFLOW_TRACKING_URI (or runs_dir of --config) at its store")
    tags = run.data.tags
    if tags.get(ROLE) not in TRAINING_ROLES:
        raise ConfigError(f"run {run_id} was not made by a fine_tune training run (tag {ROLE} = "
                          f"{tags.get(ROLE)!r}); only trials, re-runs, train and curve runs can be rerun")
    if run.info.status != "FINISHED":
        raise ConfigError(f"run {run_id} ended {run.info.status} ({tags.get(REASON, 'no reason')[:80]}); "
                          "only finished runs have results to reproduce")
    return run


def _logged_config(client, run) -> Config:
    """The run's config.yaml, read like an experiment file: a file replaced in the store (too big, an alias bomb, a
    key twice, an unknown key) is refused in one line, never expanded."""
    with tempfile.TemporaryDirectory() as tmp:
        path = download_config(client, run, tmp)
        if path is None:
            raise ConfigError(f"run {run.info.run_id} has no config.yaml (it was logged before fine_tune recorded its "
                              "config), so it cannot be rebuilt")
        try:
            return load_config(path)
        except ConfigError as e:
            why = str(e).removeprefix(f"{path}: ")
            raise ConfigError(f"run {run.info.run_id}: its config.yaml does not load ({why}); check out the commit it "
                              "was made at") from None


def _here(cfg: Config, here: Config) -> Config:
    """The run's config with this machine's paths: where to write (runs_dir, and with it the stores, backbones and
    caches) and where the data are never come from a store, where they may name another machine's folders."""
    return cfg.model_copy(update={"runs_dir": here.runs_dir, "data_dir": here.data_dir})


def _run_threads(cfg: Config, metrics: dict) -> tuple[Config, list[str]]:
    """`cfg` with the thread count the run trained with (metric `threads`: the count changes floating-point sums),
    validated like the config key; a value that is not a thread count is left out, with the note saying so."""
    if cfg.threads is not None or "threads" not in metrics:
        return cfg, []
    value = metrics["threads"]
    try:  # a metric is a float: a whole one is the count, anything else is for the config's own check to refuse
        count = int(value) if math.isfinite(value) and float(value).is_integer() else value
        return Config.model_validate({**cfg.model_dump(mode="json"), "threads": count}), []
    except ValidationError as e:
        why = e.errors()[0]["msg"]
        return cfg, [f"the thread count may differ: the run logged threads={value:g}, which is not a thread count "
                     f"({why[0].lower()}{why[1:]}), so this re-run uses this machine's"]


def _backbone(cfg: Config, params: dict, here: Config, log: Callable[[str], None]) -> tuple[str | None, list[str]]:
    """The backbone the run used, found by its hash: at this machine's `pretrained:`, at the path the run logged (only a
    hint: it may be another machine's) or among the cached backbones; made again if gone, with a note when the new one
    differs. A checkpoint of the user's own cannot be made again: only this machine's `pretrained:` stands in for it."""
    want, hint = params.get("pretrained_sha256", "none"), params.get("pretrained", "")
    if want == "none":
        return None, []
    if re.fullmatch(r"[0-9a-f]{16,64}", want):  # a value from a store: an empty or odd one must match nothing
        for path in [here.pretrained, hint, *sorted(glob.glob(str(cfg.run_dir() / "pretrained" / "*.pt")))]:
            if path and Path(path).is_file() and checkpoints.file_sha256(path).startswith(want):
                return path, []
    if cfg.pretrained:
        if not (here.pretrained and Path(here.pretrained).is_file()):
            raise CheckpointError(f"the run fine-tuned your own checkpoint {hint} (sha256 {want}), which is not on "
                                  "this machine; copy it here and point `pretrained:` of --config (or --set "
                                  "pretrained=PATH) at it")
        path = here.pretrained
    else:
        log(f"backbone {want} is not on this machine; making it again from the run's config")
        path = backbone_for(cfg, log)
    if path and checkpoints.file_sha256(path).startswith(want):
        return path, []
    return path, [f"the backbone differs: the run used {want}, the one used now is "
                  f"{checkpoints.file_sha256(path)[:16] if path else 'none'}"]


def _comparison(run, result: Result, causes: list[str], new_id: str) -> tuple[bool, str]:
    """Whether every compared metric is identical, and the table and verdict that say so."""
    logged = {k: run.data.metrics.get(key) for k, key in COMPARED}
    now = {k: result.metrics.get(k) for k, _ in COMPARED}
    same = all(logged[k] is not None and logged[k] == now[k] for k, _ in COMPARED)
    lines = [f"{'metric':16s} {'logged':>10s} {'reproduced':>11s}  difference"]
    for k, _ in COMPARED:
        diff = "-" if logged[k] is None or now[k] is None else f"{now[k] - logged[k]:+.2e}"
        lines.append(f"{k:16s} {logged[k] if logged[k] is not None else float('nan'):10.4f} "
                     f"{now[k] if now[k] is not None else float('nan'):11.4f}  {diff}")
    verdict = ("identical: every compared metric is the same to the last bit" if same else
               "different: " + ("; ".join(causes) if causes else "same code, tree, environment, data and backbone: "
                                "another CPU (its instruction set orders floating-point sums differently), or "
                                "nondeterminism in the run itself (threads, device kernels)"))
    lines += ["", f"verdict: {verdict}", f"new run {new_id} (tag {RERUN_OF} = {run.info.run_id})"]
    return same, "\n".join(lines)


def reproduce(run_id: str, here: Config | None = None, log: Callable[[str], None] = print) -> tuple[bool, str]:
    """Reproduce the run `run_id` from its logged config, on this machine's paths (runs_dir, data_dir, `pretrained:`
    of `here`: the `--config` given, else the defaults). Returns whether every compared metric is identical, and the
    printed comparison."""
    here = here or Config()
    uri = tracking_uri(here.runs_dir)
    check_reachable(uri)
    client = mlflow_client(uri)
    run = _finished_training_run(client, run_id, uri)
    cfg = _here(_logged_config(client, run), here)
    preflight(cfg)
    cfg, notes = _run_threads(cfg, run.data.metrics)
    notes += differences(run.data.tags)
    for note in notes:
        log(f"warning: {note}")
    backbone, more = _backbone(cfg, run.data.params, here, log)
    if cfg.pretrained:  # the config this re-run logs names the checkpoint it used
        cfg = cfg.model_copy(update={"pretrained": backbone})
    splits = splits_for(cfg)
    logged_digests = {i.dataset.digest for i in run.inputs.dataset_inputs}
    if logged_digests and logged_digests != set(splits.digests.values()):
        more.append("the data differ: the splits made now do not hash like the run's dataset inputs")
    result, new_id = tracked_train(cfg, splits, backbone, {ROLE: REPRODUCTION, RERUN_OF: run_id},
                                   "rerun", f"{run.info.run_name}/rerun",
                                   experiment=client.get_experiment(run.info.experiment_id).name)
    return _comparison(run, result, notes + more, new_id)
