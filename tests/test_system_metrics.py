"""What each run cost the machine: a real tiny sweep on a real SQLite MLflow store, then MLflow's system metrics
(`system/...`, the run page's "System metrics" tab) read back from every trial's run and from the study's parent."""
import pytest
from helpers import runs_of, tiny_sweep
from mlflow.tracking import MlflowClient

from fine_tune.study.sweep import run_sweep
from fine_tune.track.stores import tracking_uri

# what MLflow's CPU monitor logs on any machine (GPU metrics need nvidia-ml-py and a GPU)
MACHINE = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
           "system/system_memory_usage_percentage")


@pytest.mark.slow
def test_every_trial_and_the_parent_hold_system_metrics(tmp_path, tiny_backbone):
    cfg = tiny_sweep(tmp_path / "runs", tiny_backbone[0], "sysmetrics", 2)
    run_sweep(cfg, progress=False, log=lambda s: None)
    runs = runs_of(cfg.runs_dir, "sysmetrics")
    client = MlflowClient(tracking_uri(cfg.runs_dir))
    trials = runs[runs["tags.fine_tune.role"] == "trial"]
    parent = runs[runs["tags.fine_tune.role"] == "study"]
    assert len(trials) == 2 and len(parent) == 1
    for run_id in [*trials.run_id, *parent.run_id]:
        for key in MACHINE:
            history = client.get_metric_history(run_id, key)
            assert history, (run_id, key)  # at least the sample taken when the run ended, however short it was
            assert all(m.value >= 0 for m in history)
            assert [m.step for m in history] == list(range(len(history)))  # one step per sample, none twice
        cpu = [m.value for m in client.get_metric_history(run_id, MACHINE[0])]
        assert all(0 <= v <= 100 for v in cpu)
    # a second sweep continues the parent's system metrics after its last step rather than writing over them
    before = len(client.get_metric_history(parent.run_id.iloc[0], MACHINE[0]))
    run_sweep(cfg, n_trials=1, progress=False, log=lambda s: None)
    steps = [m.step for m in client.get_metric_history(parent.run_id.iloc[0], MACHINE[0])]
    assert len(steps) > before and steps == list(range(len(steps)))
