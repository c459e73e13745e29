"""python -m analysis report --study NAME [--config FILE] [--runs-dir runs] [--out reports] [--resamples 2000]
python -m analysis compare --studies A B [...] [--config FILE] [--runs-dir runs] [--out reports] [--resamples 2000]
python -m analysis curve --study NAME [--config FILE] [--runs-dir runs] [--out reports]

`report` writes reports/<study>/report.md and a self-contained report.html (plus the PNGs) and logs them to the
study's MLflow parent run under report/. `compare` writes reports/compare-<a>-<b>.../, `curve` the label-efficiency
report reports/<study>-curve/ from the runs `make curve` logged. A study that does not exist
or has no finished trials ends with one line on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Before mlflow is imported: no progress bar per small JSON artifact read, no usage telemetry (as in the Makefile).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from analysis.read import StoreError, load_study
from analysis.stats import RESAMPLES
from fine_tune.cli import ArgumentParser, positive_int
from fine_tune.errors import ConfigError
from fine_tune.experiment import load_config
from fine_tune.track.stores import masked


def cmd_report(args) -> int:
    from analysis import report

    start = time.perf_counter()
    data = load_study(args.study, args.runs_dir, args.storage)
    folder = report.build(data, args.out, args.resamples)
    print(f"{folder / 'report.md'}\n{folder / 'report.html'}\nalso logged to MLflow: run {data.parent_run_id} "
          f"(experiment {data.name}), artifacts report/ ({time.perf_counter() - start:.1f}s)")
    return 0


def cmd_curve(args) -> int:
    from analysis import curve
    from fine_tune.track.stores import tracking_uri

    start = time.perf_counter()
    folder = curve.build(args.study, tracking_uri(args.runs_dir), args.out)
    print(f"{folder / 'report.md'}\n{folder / 'report.html'} ({time.perf_counter() - start:.1f}s)")
    return 0


def cmd_compare(args) -> int:
    from analysis import compare

    start = time.perf_counter()
    studies = [load_study(name, args.runs_dir, args.storage) for name in args.studies]  # all, before writing anything
    folder = compare.build(studies, args.out, args.resamples)
    print(f"{folder / 'report.md'}\n{folder / 'report.html'} ({time.perf_counter() - start:.1f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m analysis", description="Reports built from the sweep's stores.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("report", cmd_report, "report on one study"),
                            ("compare", cmd_compare, "compare several studies"),
                            ("curve", cmd_curve, "label-efficiency report of a study's `make curve` runs")):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        if name in ("report", "curve"):
            p.add_argument("--study", help="study name (default: the `study:` key of --config)")
        else:
            p.add_argument("--studies", nargs="+", required=True, help="two or more study names")
        p.add_argument("--config", type=Path, help="the experiment YAML the sweep ran: its runs_dir and sweep.storage "
                                                   "locate the stores, as they did for the sweep")
        p.add_argument("--runs-dir", help="the sweep's runs directory, holding optuna.db and mlflow.db (default: the "
                                          "config's, else runs; OPTUNA_STORAGE / MLFLOW_TRACKING_URI override)")
        p.add_argument("--out", type=Path, default=Path("reports"), help="where reports are written")
        p.add_argument("--resamples", type=positive_int, default=RESAMPLES,
                       help="bootstrap resamples for the confidence intervals of re-run trials")
    args = parser.parse_args(argv)
    if args.command == "compare" and len(args.studies) < 2:
        parser.error("compare needs two or more studies: --studies A B")
    try:
        args.storage = None
        if args.config is not None:  # the stores where the sweep put them, and its study
            cfg = load_config(args.config)
            args.runs_dir, args.storage = args.runs_dir or cfg.runs_dir, cfg.sweep.storage
            if args.command != "compare":
                args.study = args.study or cfg.study
        if args.command != "compare" and not args.study:
            parser.error("give --study NAME or --config EXPERIMENT")
        args.runs_dir = args.runs_dir or "runs"
        return args.fn(args)
    except (ConfigError, StoreError) as e:  # masked: a message may name a store by its URL
        print(f"error: {masked(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
