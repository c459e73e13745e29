"""`python -m fine_tune bench --quick` runs every figure end to end and writes the table and the JSON."""
import json

import pytest

from fine_tune.bench import run_bench


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
    md = (tmp_path / "bench.md").read_text()
    assert md.count("\n| (") == 12 and "tutorial loop" in md
