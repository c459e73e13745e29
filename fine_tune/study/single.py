"""Single runs outside a sweep: `make train` (one fine-tuning, tracked in the study's experiment unless `--no-track`)
and `make rerun RUN=<id>` (rebuild a run from its logged config.yaml, train it again, and say whether the numbers are
the same and, if not, what differs: the code, the tree, the environment, the data or the backbone).
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable

from fine_tune.config import Config
from fine_tune.errors import ConfigError
from fine_tune.learn import checkpoints
from fine_tune.learn.data import Splits, splits_for
from fine_tune.learn.pretrain import backbone_for
from fine_tune.learn.train import NullTracker, Result, train
from fine_tune.names import REASON, REPRODUCTION, RERUN_OF, ROLE, TRAIN, TRAINING_ROLES
from fine_tune.study.inputs import backbone_of, run_params, run_record
from fine_tune.study.preflight import preflight
from fine_tune.track.interrupts import interruptible
from fine_tune.track.provenance import differences, log_provenance
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
        f"{len(splits.val)} / test {len(splits.test)} images | backbone {backbone or 'none (from scratch)'} | frozen "
        f"{cfg.frozen_layers}, head {cfg.head_size}, lr {cfg.lr:g}")
    if not track:
        return train(cfg, splits, backbone, tracker=NullTracker(), on_epoch=on_epoch), None
    return tracked_train(cfg, splits, backbone, {ROLE: TRAIN}, "train", f"train/s{cfg.seed}", on_epoch)


# --- make rerun


def _logged_config(client, run) -> Config:
    import tempfile

    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri).download_artifacts(
                "config.yaml", tmp)
            raw = yaml.safe_load(Path(path).read_text())
    except (MlflowException, OSError):
        raise ConfigError(f"run {run.info.run_id} has no config.yaml (it was logged before fine_tune recorded its "
                          "config), so it cannot be rebuilt") from None
    try:
        return Config.model_validate(raw)
    except Exception as e:
        raise ConfigError(f"run {run.info.run_id}: its config.yaml no longer validates ({str(e).splitlines()[0]}); "
                          "check out the commit it was made at") from None


def _backbone(cfg: Config, params: dict, log: Callable[[str], None]) -> tuple[str | None, list[str]]:
    """The backbone the run used, found by its hash (where it was, or among the cached backbones); made again if it is
    gone, with a note when the new one differs."""
    want = params.get("pretrained_sha256", "none")
    if want == "none":
        return None, []
    candidates = [params.get("pretrained", "")] + sorted(glob.glob(str(cfg.run_dir() / "pretrained" / "*.pt")))
    for path in candidates:
        if path and Path(path).is_file() and checkpoints.file_sha256(path).startswith(want):
            return path, []
    log(f"backbone {want} is not on this machine; making it again from the run's config")
    path = backbone_for(cfg, log)
    if path and checkpoints.file_sha256(path).startswith(want):
        return path, []
    return path, [f"the backbone differs: the run used {want}, the one made again is "
                  f"{checkpoints.file_sha256(path)[:16] if path else 'none'}"]


def reproduce(run_id: str, runs_dir: str = "runs", log: Callable[[str], None] = print) -> tuple[bool, str]:
    """Reproduce the run `run_id`: returns whether every compared metric is identical, and the printed comparison."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(runs_dir)
    check_reachable(uri)
    client = mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run {run_id} is not in {uri}; copy its id from the MLflow UI or point "
                          "MLFLOW_TRACKING_URI / --runs-dir at its store") from None
    tags, params = run.data.tags, run.data.params
    if tags.get(ROLE) not in TRAINING_ROLES:
        raise ConfigError(f"run {run_id} was not made by a fine_tune training run (tag {ROLE} = "
                          f"{tags.get(ROLE)!r}); only trials, re-runs, train and curve runs can be rerun")
    if run.info.status != "FINISHED":
        raise ConfigError(f"run {run_id} ended {run.info.status} ({tags.get(REASON, 'no reason')[:80]}); "
                          "only finished runs have results to reproduce")
    cfg = _logged_config(client, run)
    preflight(cfg)
    if cfg.threads is None and "threads" in run.data.metrics:  # the count changes the sums: train with the run's
        cfg = cfg.model_copy(update={"threads": int(run.data.metrics["threads"])})
    notes = differences(tags)
    for note in notes:
        log(f"warning: {note}")
    backbone, more = _backbone(cfg, params, log)
    splits = splits_for(cfg)
    logged_digests = {i.dataset.digest for i in run.inputs.dataset_inputs}
    if logged_digests and logged_digests != set(splits.digests.values()):
        more.append("the data differ: the splits made now do not hash like the run's dataset inputs")
    result, new_id = tracked_train(cfg, splits, backbone, {ROLE: REPRODUCTION, RERUN_OF: run_id},
                                   "rerun", f"{run.info.run_name}/rerun",
                                   experiment=client.get_experiment(run.info.experiment_id).name)
    logged = {k: run.data.metrics.get(key) for k, key in COMPARED}
    now = {k: result.metrics.get(k) for k, _ in COMPARED}
    same = all(logged[k] is not None and logged[k] == now[k] for k, _ in COMPARED)
    lines = [f"{'metric':16s} {'logged':>10s} {'reproduced':>11s}  difference"]
    for k, _ in COMPARED:
        diff = "-" if logged[k] is None or now[k] is None else f"{now[k] - logged[k]:+.2e}"
        lines.append(f"{k:16s} {logged[k] if logged[k] is not None else float('nan'):10.4f} "
                     f"{now[k] if now[k] is not None else float('nan'):11.4f}  {diff}")
    causes = notes + more
    verdict = ("identical: every compared metric is the same to the last bit" if same else
               "different: " + ("; ".join(causes) if causes else "same code, tree, environment, data and backbone: "
                                "nondeterminism in the run itself (threads, device kernels)"))
    lines += ["", f"verdict: {verdict}", f"new run {new_id} (tag fine_tune.rerun_of = {run_id})"]
    return same, "\n".join(lines)
