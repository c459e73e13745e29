"""What produced a run: the code (git commit, branch, a dirty flag and the diff), the environment (python, torch,
CUDA / CPU, every installed package and a hash of them all), the fully resolved config, and the data (each split's
digest). Read once per process; `tracking` writes it as MLflow's own source tags, inputs and artifacts, so the UI's
Source, Version and Dataset columns fill and `python -m fine_tune rerun` can rebuild the run.
"""
from __future__ import annotations

import functools
import getpass
import hashlib
import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fine_tune.track.stores import masked

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CodeState:
    commit: str  # "unknown" outside a git checkout
    branch: str
    remote: str
    dirty: bool
    diff: str  # `git diff HEAD` and the untracked files' names when dirty, else "", URL passwords masked

    @property
    def diff_sha(self) -> str:
        return hashlib.sha256(self.diff.encode()).hexdigest()[:16] if self.dirty else "none"


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() if out.returncode == 0 else ""


def code_state(root: Path | None = None) -> CodeState:
    """The checkout's commit and whether (and how) the working tree differs from it, read once per process: the code
    a process runs is what it imported when it started."""
    return _code_state(root or REPO)


@functools.lru_cache(maxsize=4)
def _code_state(root: Path) -> CodeState:
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return CodeState("unknown", "", "", False, "")
    status = _git(root, "status", "--porcelain", "--untracked-files=all")
    diff = ""
    if status:
        untracked = [line[3:] for line in status.splitlines() if line.startswith("??")]
        # a tracked experiment YAML may hold a storage URL with its password: the diff is logged with every study
        diff = masked(_git(root, "diff", "HEAD") + "".join(f"\n# untracked: {name}" for name in untracked))
    remote = _git(root, "config", "--get", "remote.origin.url")
    return CodeState(commit, _git(root, "rev-parse", "--abbrev-ref", "HEAD"), masked(remote), bool(status), diff)


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Python, torch, the accelerator and every installed package's version; `sha256` hashes all of it."""
    import importlib.metadata

    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch_threads": torch.get_num_threads(),
           "packages": dict(sorted({d.metadata["Name"].lower(): d.version
                                    for d in importlib.metadata.distributions() if d.metadata["Name"]}.items()))}
    env["sha256"] = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    return env


def source_tags(verb: str, root: Path | None = None) -> dict[str, str]:
    """MLflow's own source tags (the UI's Source, Version and User columns) and ours for the tree and environment."""
    code = code_state(root)
    return {"mlflow.source.name": f"python -m fine_tune {verb}", "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": code.commit, "mlflow.source.git.branch": code.branch,
            "mlflow.source.git.repoURL": code.remote, "mlflow.user": getpass.getuser(),
            "fine_tune.git.dirty": str(code.dirty).lower(), "fine_tune.git.diff_sha": code.diff_sha,
            "fine_tune.env_sha": environment()["sha256"], "fine_tune.python": sys.version.split()[0]}


def differences(logged: dict[str, str], root: Path | None = None) -> list[str]:
    """Why a rerun may not reproduce a run whose tags are `logged`: what differs between then and now."""
    now, out = source_tags("rerun", root), []
    if logged.get("mlflow.source.git.commit") != now["mlflow.source.git.commit"]:
        out.append(f"the code differs: the run was made at commit {logged.get('mlflow.source.git.commit', '?')[:12]}, "
                   f"this checkout is at {now['mlflow.source.git.commit'][:12]}")
    if logged.get("fine_tune.git.dirty") == "true" or now["fine_tune.git.dirty"] == "true":
        which = [w for w, d in (("the run's", logged.get("fine_tune.git.dirty") == "true"),
                                ("this checkout's", now["fine_tune.git.dirty"] == "true")) if d]
        if logged.get("fine_tune.git.diff_sha") != now["fine_tune.git.diff_sha"] or len(which) == 1:
            out.append(f"the code differs: {' and '.join(which)} tree had uncommitted changes")
    if logged.get("fine_tune.env_sha") != now["fine_tune.env_sha"]:
        out.append("the environment differs (python, torch, packages or device): compare the runs' environment.json")
    return out


def config_yaml(cfg) -> str:
    """The fully resolved config, every key with defaults included: what `rerun` rebuilds the run from. The storage
    URL's password is masked: a run's artifacts are readable by whoever reads the tracking server."""
    import yaml

    values = cfg.model_dump(mode="json")
    if values["sweep"]["storage"]:
        values["sweep"]["storage"] = masked(values["sweep"]["storage"])
    return yaml.safe_dump(values, sort_keys=False)


def datasets(cfg, splits) -> list[tuple[str, str, str, str]]:
    """(name, digest, context, source) of the run's train / validation / test examples, for MLflow's Dataset
    column (a text set's digest covers its token ids, so another tokenizer or max_length is another dataset)."""
    if cfg.data.root:
        source, name = str(Path(cfg.data.root).resolve()), Path(cfg.data.root).name
    else:
        source = name = "fortunes" if cfg.data.kind == "fortunes" else "fashion_mnist"
    if cfg.data.kind == "fortunes":
        name = f"fortunes:{'+'.join(map(str, cfg.classes or []))}"[:200]
    shift = "" if cfg.data.shift == "none" else f"+{cfg.data.shift}"
    return [(f"{name}{shift}", splits.digests[split], context, source)
            for split, context in (("train", "train"), ("val", "validation"), ("test", "test"))]


def log_provenance(run, tags: dict) -> None:
    """The environment (and the diff of a dirty tree) as artifacts of `run`, unless `tags` (the run's) say it holds
    this very environment and diff already: a study logs them once, its trials refer to them by hash."""
    now = source_tags("")
    files = {}
    if tags.get("fine_tune.env_sha") != now["fine_tune.env_sha"] or tags.get("fine_tune.logged_env") != "true":
        files["provenance/environment.json"] = json.dumps(environment(), indent=2)
    if code_state().dirty and tags.get("fine_tune.logged_diff") != now["fine_tune.git.diff_sha"]:
        files["provenance/diff.patch"] = code_state().diff
    if files:
        run.log_texts(files)
        run.set_tags({"fine_tune.logged_env": "true", "fine_tune.logged_diff": now["fine_tune.git.diff_sha"]})


def logged_run(client, run_id: str):
    """The run `run_id` as the tracking store holds it, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def download_config(client, run, into: str) -> str | None:
    """The config.yaml `run` logged (what `rerun` rebuilds it from), downloaded into the folder `into`; None when the
    run has none (it was logged before fine_tune recorded its config)."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        return get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri).download_artifacts(
            "config.yaml", into)
    except (MlflowException, OSError):
        return None
