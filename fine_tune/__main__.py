"""python -m fine_tune {data,pretrain,train,rerun,sweep,confirm,curve,ui,keys,models} [--config experiments/X.yaml] [--set key=value ...]

Bad input (config, data, checkpoint) ends with one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

from fine_tune.cli import ArgumentParser, positive_int
from fine_tune.errors import CheckpointError, ConfigError, DataError, StorageError, TrackingError, WorkerDied, causes
from fine_tune.learn import threads  # light; notes how busy the machine is from here on (threads.busy_elsewhere)
from fine_tune.track.interrupts import Terminated
from fine_tune.track.stores import masked

USER_ERRORS = (ConfigError, DataError, CheckpointError, StorageError, TrackingError)


def disk_full(e: BaseException) -> BaseException | None:
    """The full disk behind `e` (it, or what caused it): ENOSPC, SQLite's "database or disk is full", or torch.save's
    "basic_ios::clear: iostream error" on a file it could not finish; None if there is none."""
    import errno

    return next((c for c in causes(e) if getattr(c, "errno", None) == errno.ENOSPC or "disk is full" in str(c)
                 or "iostream error" in str(c)), None)


# Who closes what a store on a full disk could not record as ended (a trial's run, the parent run, the trial).
LEFT_RUNNING = {"sweep": "the next sweep closes it and re-queues the trial",
                "confirm": "the next confirm on this machine closes it"}


def full_disk(e: BaseException, verb: str) -> str:
    """The one line a full disk ends a verb with, saying what became of the runs in progress."""
    full = disk_full(e)
    said = f"the disk is full ({type(full).__name__}: {(str(full).splitlines() or [''])[0][:120]})"
    if any("database or disk is full" in str(c) for c in causes(e)):  # a store on that disk refused writes
        return (f"{said}; what the stores could not record as ended is left RUNNING "
                f"({LEFT_RUNNING.get(verb, 'it stays so in MLflow')}): free some space and run the same command again")
    return (f"{said}; runs in progress were closed and the stores kept what they had: free some space and run the "
            "same command again")


def stopped_by(e: BaseException, verb: str) -> tuple[str, int] | None:
    """What ended a verb when a library wrapped it in an error of its own: our one line and exit code for a user
    error (2) or a full disk (1); None for anything else."""
    user = next((c for c in causes(e) if isinstance(c, USER_ERRORS)), None)
    if user is not None:
        return str(user), 2
    return (full_disk(e, verb), 1) if disk_full(e) else None


def _config(args):
    """The validated config, read before a verb imports torch, Optuna or MLflow: a bad file answers at once."""
    from fine_tune.experiment import load_config

    cfg = load_config(args.config, args.set or ())
    workers = (getattr(args, "workers", None) or cfg.sweep.workers) if args.verb == "sweep" else 1
    threads.configure(cfg, workers)  # before torch is imported: OpenMP reads its wait policy once
    return cfg


def cmd_data(args) -> int:
    cfg = _config(args)
    from fine_tune.learn import data, fashion

    where = (cfg.data.root or "/usr/share/games/fortunes" if cfg.data.kind != "fashion_mnist" else
             f"{fashion.prepare(cfg.data_dir)}/FashionMNIST")
    source = data.source_for(cfg)
    counts = ", ".join(f"{len(p.y)} {name}" for name, p in (("training", source.train), ("validation", source.val),
                                                              ("test", source.test)) if p is not None)
    print(f"{cfg.data.kind} ready in {where}: {counts} {source.unit}, classes "
          f"{', '.join(f'{i}={n}' for i, n in enumerate(source.class_names))}")
    return 0


def cmd_models(args) -> int:
    from fine_tune import archs
    from fine_tune.learn.models import describe

    from fine_tune.learn.encoders import PACKAGED

    if args.layers:
        return _layers(args.layers)
    print(f"{'model':42s} {'stages':>6s} {'parameters':>12s}  input")
    for name in [*archs.SMALL, *archs.TORCHVISION, *(archs.HF + n for n in PACKAGED)]:
        stages, params = describe(name)
        size = archs.native_size(name)
        print(f"{name:42s} {stages:6d} {params:12,d}  {f'{size}x{size} images' if size else 'text'}")
    print(f"and any Hugging Face encoder of the BERT, RoBERTa, DistilBERT or MiniLM families as {archs.HF}<hub id or "
          "folder>")
    return 0


def _layers(arch: str) -> int:
    """The layers LoRA can adapt in `arch`, by stage: the names `lora_targets` matches the ends of."""
    from pydantic import ValidationError

    from fine_tune.config import Hyperparameters
    from fine_tune.learn.lora import layers_by_stage

    try:
        Hyperparameters(model=arch)
    except ValidationError as e:
        raise ConfigError(f"--layers: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    print(f"layers of {arch} that LoRA can adapt (lora_targets matches the ends of these names):")
    for i, names in enumerate(layers_by_stage(arch), start=1):
        print(f"  stage {i}: {', '.join(names) if names else '(none)'}")
    return 0


def cmd_pretrain(args) -> int:
    cfg = _config(args)
    from fine_tune.learn.pretrain import backbone_for

    if cfg.pretrain is None and not cfg.pretrained:
        raise ConfigError(f"{args.config}: pretrain: not set, so there is nothing to pretrain; add a `pretrain:` section")
    print(f"backbone: {backbone_for(cfg)}")
    return 0


def print_table(result) -> None:
    m = result.metrics
    print(f"\n{'':14s}{'accuracy':>10s}{'macro-F1':>10s}")
    for split in ("val", "test"):
        print(f"{split:14s}{m[f'{split}/accuracy']:10.4f}{m[f'{split}/f1_macro']:10.4f}")
    print(f"\nper-class test F1 (best epoch {result.best_epoch} of {m['epochs_run']}, "
          f"{m['trainable_params']:,} trainable parameters, {m['time/train_s']:.1f}s):")
    for name, f in result.per_class_f1.items():
        print(f"  {name:14s}{f:8.4f}")


def cmd_train(args) -> int:
    cfg = _config(args)
    from fine_tune.learn import checkpoints
    from fine_tune.study.single import train_once

    def progress(epoch: int, m: dict) -> None:
        print(f"epoch {epoch:3d}/{cfg.epochs}  train/loss {m['train/loss']:.4f}  val/loss {m['val/loss']:.4f}  "
              f"val/accuracy {m['val/accuracy']:.4f}  val/f1_macro {m['val/f1_macro']:.4f}  "
              f"({m['time/epoch_s']:.1f}s)", flush=True)

    result, run_id = train_once(cfg, not args.no_track, on_epoch=progress)
    out = {"status": result.status, "message": result.message, **result.metrics,
           "per_class_f1": result.per_class_f1, "confusion": result.confusion}
    if result.status == "finished":
        print_table(result)
        ckpt = checkpoints.save(result.model.state_dict(), cfg.run_dir() / "train" / cfg.study / "best.pt")
        print(f"\nbest-epoch checkpoint: {ckpt}")
    else:
        print(f"\nrun {result.status}: {result.message}", file=sys.stderr)
    if run_id:
        print(f"tracked: MLflow run {run_id} (experiment {cfg.study}); `make rerun RUN={run_id}` reproduces it")
    if args.json:
        checkpoints.save_json(out, args.json)
    return 0 if result.status == "finished" else 1


def cmd_rerun(args) -> int:
    from fine_tune.study.single import reproduce

    # this machine's paths (runs_dir, data_dir, pretrained) from --config / --set; the run's own config from the store
    same, text = reproduce(args.run_id, _config(args))
    print(text)
    return 0 if same else 1


def cmd_sweep(args) -> int:
    cfg = _config(args)
    from fine_tune.study.summary import summary, top_table
    from fine_tune.study.sweep import run_sweep

    study = run_sweep(cfg, args.n_trials, args.workers or cfg.sweep.workers)
    s = summary(study)
    print(f"\n{cfg.study}: {s['trials_complete']} complete, {s['trials_pruned']} pruned, {s['trials_failed']} failed"
          + (f"; best {cfg.sweep.objective} {s['best_value']:.4f} (trial {s['best_trial']})" if "best_value" in s else ""))
    print(top_table(study))
    print("\nnext: `make ui` to browse the runs (it prints the URL of the study's trials, best first), `make report` for the "
          "report")
    return 0


def cmd_confirm(args) -> int:
    cfg = _config(args)
    from fine_tune.study.confirm import confirm

    added = confirm(cfg, args.top_k, args.seeds, vary=args.vary)
    print(f"{added} re-runs added to {cfg.study}; `make report` now shows mean ± std, 95% CIs and McNemar's test")
    return 0


def cmd_curve(args) -> int:
    cfg = _config(args)
    from fine_tune.names import curve_experiment
    from fine_tune.study.efficiency import run_curve

    added = run_curve(cfg)
    print(f"{added} runs added to {curve_experiment(cfg.study)}; `python -m analysis curve --config {args.config}` (make curve "
          "does both) writes the plot and the table")
    return 0


def ui_link(cfg, uri: str) -> str:
    """Where `make ui` opens, under the UI's root: the study's trials view (track/views.py, written into a local store
    here too, for studies swept before it existed), the plain runs table of an experiment without a search space,
    else the experiments list. MLflow 3.17's UI opens an experiment on its GenAI overview unless the URL asks for the
    model-training layout."""
    from fine_tune.track.stores import mlflow_client
    from fine_tune.track.views import save_trials_view, view_link

    client = None if uri.startswith(("http://", "https://")) else mlflow_client(uri)
    experiment = client.get_experiment_by_name(cfg.study) if client else None
    if experiment is None:
        return "#/experiments?workflowType=machine_learning"
    if cfg.search is None:
        return f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    save_trials_view(client, experiment.experiment_id, list(cfg.search.dimensions()), cfg.sweep.objective)
    return view_link(experiment.experiment_id)


def cmd_ui(args) -> int:
    import os

    from fine_tune.track.stores import artifact_location, tracking_uri

    cfg = _config(args)
    uri = tracking_uri(cfg.runs_dir)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {cfg.study}: {masked(base)}/{ui_link(cfg, uri)}", flush=True)
    if uri.startswith(("http://", "https://")):
        print(f"(the tracking server {masked(uri)} serves it; nothing to start here)")
        return 0
    mlflow = str(Path(sys.executable).parent / "mlflow")
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    os.execv(mlflow, [mlflow, "server", "--backend-store-uri", uri, "--default-artifact-root",
                      artifact_location(uri) or str(Path(cfg.runs_dir) / "mlartifacts"), "--host", args.host,
                      "--port", str(args.port), "--workers", "1"])
    return 0


def cmd_keys(args) -> int:
    from fine_tune.experiment import describe_keys

    print("config keys (YAML or --set key=value):\n" + describe_keys())
    return 0


def _verb_options(name: str, p) -> None:
    """The options a verb takes beyond --config and --set."""
    if name == "train":
        p.add_argument("--json", type=Path, help="also write the final metrics to this JSON file")
        p.add_argument("--no-track", action="store_true", help="do not log the run to MLflow (a quick local try)")
    elif name == "ui":
        p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
        p.add_argument("--port", type=int, default=5000)
    elif name == "rerun":
        p.add_argument("run_id", help="the MLflow run id to reproduce (a trial, re-run, train or curve run)")
    elif name == "confirm":
        p.add_argument("--top-k", type=positive_int, default=3, help="how many of the best trials to re-train")
        p.add_argument("--seeds", type=positive_int, default=3, help="new seeds per trial")
        p.add_argument("--vary", choices=("seed", "backbone"), default="seed",
                       help="what each new seed changes: the fine-tuning only (seed), or the backbone's pretraining "
                            "too (backbone: pretrained again per seed)")
    elif name == "models":
        p.add_argument("--layers", metavar="MODEL", help="list the layers of MODEL that LoRA can adapt, by stage")
    elif name == "sweep":
        p.add_argument("--n-trials", type=positive_int, help="finished trials to add in this run (default: "
                                                             "sweep.n_trials)")
        p.add_argument("--workers", type=positive_int, help="worker processes sharing the study (default: "
                                                            "sweep.workers)")


VERBS = (("data", cmd_data, "locate Fashion-MNIST (make data also installs it)"),
         ("pretrain", cmd_pretrain, "pretrain the backbone on the source task (cached)"),
         ("train", cmd_train, "fine-tune once and print the final table (tracked in MLflow)"),
         ("rerun", cmd_rerun, "reproduce a run from its logged config and compare the numbers"),
         ("sweep", cmd_sweep, "run or resume the Optuna study of the experiment"),
         ("confirm", cmd_confirm, "re-train the study's top trials with new seeds"),
         ("curve", cmd_curve, "label-efficiency curve: fine-tuned vs from scratch vs linear probe"),
         ("ui", cmd_ui, "MLflow UI over the experiment's store, printing the URL of its runs table"),
         ("keys", cmd_keys, "list every config key with its default"),
         ("models", cmd_models, "list every model with its stage count and parameter count"))

# What was closed when Ctrl-C or SIGTERM stopped a verb.
CLOSED = {"sweep": ": the running trial was closed and re-queued; run the same command again to resume",
          "confirm": ": the running re-run was closed as KILLED; run the same command again (finished re-runs are "
                     "skipped)",
          "curve": ": the running run was closed as KILLED; run the same command again (finished runs are skipped)",
          "train": ": the run was closed as KILLED", "rerun": ": the run was closed as KILLED"}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fine_tune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, fn, help_ in VERBS:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--config", type=Path, help="experiment YAML (defaults if omitted)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        _verb_options(name, p)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as e:  # masked: a message may name a store by its URL
        print(f"error: {masked(str(e))}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"error: {masked(str(e))}", file=sys.stderr)
        return 1
    except Exception as e:
        said = stopped_by(e, args.verb)
        if said is None:
            raise
        print(f"error: {masked(said[0])}", file=sys.stderr)
        return said[1]
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"{'terminated' if terminated else 'interrupted'}{CLOSED.get(args.verb, '')}", file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
