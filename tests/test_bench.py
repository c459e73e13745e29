"""`python -m fine_tune bench --quick` runs every figure end to end and writes the table and the JSON."""
import datetime
import json
from types import SimpleNamespace

import pytest

from fine_tune.bench import run_bench, steady_rate


@pytest.mark.slow
def test_quick_bench_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_bench(quick=True, log=lambda s: None, out=tmp_path)
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in ("a_tutorial_s_per_epoch", "b_ours_b64", "c_frozen1_uncached", "c_frozen1_cached",
                "c_frozen2_uncached", "c_frozen2_cached", "d_ours_b256", "e_tracking_typical_trial",
                "e_tracking_full_trial", "f_workers", "g_pruning"):
        assert key in figures, key
    assert figures["b_ours_b64"]["speedup_vs_a"] > 1  # in-memory batches beat the DataLoader even tiny
    assert figures["d_ours_b256"]["floor_s"] > 0 and figures["f_workers"]["speedup"] > 0
    assert figures["f_workers"]["steady_speedup"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert md.count("\n| (") == 13 and "tutorial loop" in md


def test_steady_rate_counts_only_the_window_where_every_worker_runs_trials():
    """Worker a runs 0-1, 1-2, 2-3 s; worker b starts half a second late and runs 0.5-1.5, 1.5-2.5 s. While both
    run (0.5-2.5 s) they do half of a's first and last trials, all of the other three: 4 trials in 2 s."""
    t0 = datetime.datetime(2026, 1, 1)

    def trial(worker, start, end):
        return SimpleNamespace(user_attrs={"worker": worker}, datetime_start=t0 + datetime.timedelta(seconds=start),
                               datetime_complete=t0 + datetime.timedelta(seconds=end))
    two = [trial("a", 0, 1), trial("a", 1, 2), trial("a", 2, 3), trial("b", 0.5, 1.5), trial("b", 1.5, 2.5)]
    assert steady_rate(two) == pytest.approx(4 / 2 * 60)
    assert steady_rate(two[:3]) == pytest.approx(3 / 3 * 60)  # one worker: the whole span
