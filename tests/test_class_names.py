"""Class names MLflow refuses as metric keys (`T-shirt (top)`, `+`, `&`, `,`, an emoji, 250 characters) train and
sweep from the command line on a 250-class folder of real images, with valid and distinct keys and the real names
beside them; a write the store refuses closes its run FAILED, never leaves it RUNNING."""
import json

import pytest
from helpers import run_cli, runs_of, write_image_folder
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, _validate_metric_name

from fine_tune.track.stores import tracking_uri
from fine_tune.names import metric_keys
from fine_tune.track.tracking import run_scope
from fine_tune.track.tree import StudyTracker

AWKWARD = ["T-shirt (top)", "T-shirt/top", "+", "&", ",", "👕", "🥾", "a+b", "a_b", "Ankle boot", "凉鞋", "L" * 250,
           "L" * 249 + "M", "x:y", "50% off"]


def test_metric_keys_are_valid_distinct_and_keep_valid_names():
    keys = metric_keys("test/f1/", AWKWARD)
    for key in keys.values():
        _validate_metric_name(key)  # MLflow's own check (raises on a bad key)
        assert len(key) <= MAX_ENTITY_KEY_LENGTH
    assert len(set(keys.values())) == len(AWKWARD)
    assert keys["Ankle boot"] == "test/f1/Ankle boot" and keys["a_b"] == "test/f1/a_b"  # a valid name is its key
    assert keys["凉鞋"] == "test/f1/凉鞋" and keys["T-shirt (top)"] == "test/f1/T-shirt _top_"
    assert keys["a+b"].startswith("test/f1/a_b-")  # meets 'a_b': the name's hash tells them apart
    assert metric_keys("test/f1/", ["T-shirt/top"]) == {"T-shirt/top": "test/f1/T-shirt_top"}  # as before


@pytest.fixture
def tracker(tmp_path):
    t = StudyTracker("tracked", tracking_uri(tmp_path / "runs"))
    yield t
    t.close()


@pytest.mark.parametrize("when", ["in its last write", "in a write before"])
def test_a_refused_write_closes_the_run_failed_not_running(tracker, when):
    """A metric the store refuses (once kept in the buffer and written again by every close) fails the run: closed
    FAILED with the store's reason, the error raised."""
    handle = {}
    with pytest.raises(MlflowException, match="Invalid value"), \
            run_scope(lambda: tracker.start_trial(0, {"lr": 0.1})) as run:
        handle["run"] = run
        run.log_metrics({"val/f1_macro": 0.5, "test/f1/T-shirt (top)": 0.5}, step=1)
        if when == "in a write before":
            run.flush()
    info = tracker.client.get_run(handle["run"].run_id)
    assert info.info.status == "FAILED"
    assert "final write failed" in info.data.tags["fine_tune.reason"] and "Invalid value" in info.data.tags[
        "fine_tune.reason"]


def write_250_classes(root):
    """250 class folders of real images: the awkward names, then plain ones (class ids cycle through the ten)."""
    names = AWKWARD[:1] + AWKWARD[2:] + [f"class {i:03d}" for i in range(250 - len(AWKWARD) + 1)]  # no '/' in a folder
    return write_image_folder(root, {name: i % 10 for i, name in enumerate(names)}, per_class=2, test_per_class=1)[0]


@pytest.mark.slow
def test_awkward_class_names_train_and_sweep_from_the_cli(tmp_path):
    root = write_250_classes(tmp_path / "images")
    (tmp_path / "e.yaml").write_text(f"study: names\ndata: {{kind: imagefolder, root: {root}}}\nval_per_class: 1\n"
                                     "budget_per_class: 1\nepochs: 1\n"
                                     "search: {lr: {low: 1.0e-3, high: 1.0e-2, log: true}}\n"
                                     "sweep: {n_trials: 2, pruner: none}\n")
    for verb in ("train", "sweep"):
        done = run_cli(tmp_path, verb, "--config", "e.yaml")
        assert done.returncode == 0, done.stderr[-3000:]
    runs = runs_of(tmp_path / "runs", "names")
    assert sorted(runs["status"]) == ["FINISHED"] * 4  # the train run, the sweep's parent and its two trials
    f1_keys = [c for c in runs.columns if c.startswith("metrics.test/f1/")]
    assert len(f1_keys) == 250 and "metrics.test/f1/T-shirt _top_" in f1_keys
    trained = runs.loc[runs["metrics.test/accuracy"].notna(), "run_id"].tolist()
    assert len(trained) == 3
    for run_id in trained:  # the real names beside their keys
        saved = tmp_path / "runs" / "mlartifacts" / run_id / "artifacts" / "evaluation" / "per_class_f1.json"
        per_class = json.loads(saved.read_text())
        assert sorted(c["class"] for c in per_class) == sorted(p.name for p in (root / "train").iterdir())
        assert sorted(f"metrics.{c['metric']}" for c in per_class) == sorted(f1_keys)
