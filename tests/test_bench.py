"""`make bench --quick` runs every figure end to end and writes the table and the JSON; the benchmark's own
arithmetic is checked on known inputs. Speed itself is not asserted here: a busy CI machine would make that flaky,
and the figures are ratios read by a person from `reports/bench.md`."""
import datetime
import json
import math
from types import SimpleNamespace

import pytest
from helpers import ROOT

from benchmarks.bench import SECTIONS, Timed, run_bench, spread, steady_rate


# What each section of `make bench` writes: its keys in bench.json and its rows in bench.md.
WRITES = {"speed": (("a_tutorial_s_per_epoch", "b_ours_b64", "c_frozen1_uncached", "c_frozen1_cached",
                     "c_frozen2_uncached", "c_frozen2_cached", "d_ours_b256", "e_tracking_typical_trial",
                     "e_tracking_full_trial", "f_workers", "g_pruning", "h_torchvision"), 15),
          "startup": (("i_startup",), 3), "load": (("j_load",), 1), "peer": (("k_peer",), 2),
          "text": (("l_text",), 2), "methods": (("m_methods",), 2)}


def test_every_section_of_the_bench_is_checked():
    assert set(WRITES) == set(SECTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("section", list(WRITES))
def test_quick_bench_writes_every_figure_of_each_section(tmp_path, section):
    """Each section on its own (`make bench ARGS="--only ..."`), so the suite's processes share them out."""
    run_bench(ROOT / "experiments" / "fashion_transfer.yaml", quick=True, log=lambda s: None, out=tmp_path,
              only=(section,))
    figures = json.loads((tmp_path / "bench.json").read_text())
    keys, rows = WRITES[section]
    assert all(key in figures for key in keys), set(keys) - set(figures)
    assert (tmp_path / "bench.md").read_text().count("\n| (") == rows
    CHECKS[section](figures)


def speed(figures: dict) -> None:
    positive = [figures["a_tutorial_s_per_epoch"]["median"], figures["b_ours_b64"]["speedup_vs_a"],
                figures["d_ours_b256"]["floor_s"], figures["f_workers"]["speedup"],
                figures["f_workers"]["steady_speedup"], figures["e_tracking_typical_trial"]["mlflow_s"]["median"],
                figures["e_tracking_typical_trial"]["inside_pct"]["median"],
                figures["h_torchvision"]["probe_cached"]["images_per_s"], figures["h_torchvision"]["full"]["floor_s"]]
    assert all(math.isfinite(v) and v > 0 for v in positive), positive
    assert figures["g_pruning"]["epochs_with_pruner"]["median"] <= figures["g_pruning"]["epochs_without"]["median"]


def startup(figures: dict) -> None:
    start = figures["i_startup"]
    assert 0 < start["to_first_trial_s"] < start["sweep_wall_s"] and start["import_profile_s"]["torch"] > 0
    assert all(v > 0 for v in start["instant_s"].values())


def load(figures: dict) -> None:
    load = figures["j_load"]["simplenet"]["s"]
    assert set(load) == {"old_idle", "old_loaded", "new_idle", "new_loaded"} and all(v > 0 for v in load.values())


def peer(figures: dict) -> None:
    peer = figures["k_peer"]  # `make test` installs optuna-integration for it, as `make bench` does
    assert peer["peer"]["trials"] == peer["ours"]["trials"] == peer["trials"] and peer["speedup_per_trial"] > 0
    assert peer["peer_holds"]["trial_runs"] == peer["ours_holds"]["trial_runs"] == peer["trials"]
    assert peer["ours_holds"]["nested"] and not peer["peer_holds"]["nested"]


def methods(figures: dict) -> None:
    methods = figures["m_methods"]  # LoRA trains a fraction of the tensors; the timings are ratios, not asserted
    assert methods["lora"]["trainable_params"] < methods["full"]["trainable_params"] / 10
    assert methods["lora_epoch_ratio"] > 0 and methods["lp_ft_trial_ratio"] > 0


def text_peer(figures: dict) -> None:
    """Row (l) tiny: Trainer.hyperparameter_search and our sweep try the same 2 points on the same fortunes; the row
    says what each MLflow tree holds, so the trees are checked here: Trainer logs its arguments and the model's
    config in the first trial's run only and never the trial's frozen_layers, with no parent, artifacts or
    datasets; ours nests every trial under the study's run with its hyperparameters, checkpoint and data."""
    from benchmarks.text_peer import text_rows

    f = figures["l_text"]
    assert "skipped" not in f, f.get("skipped")  # accelerate is pinned in requirements.txt
    hf, ours = f["hf"], f["ours"]
    assert hf["trials"] == ours["trials"] == f["trials"] == 2 and hf["params"] == ours["params"]
    assert hf["epochs"] == ours["epochs"] == 2 * f["epochs"] and f["speedup_per_trial"] > 0
    th, to = f["hf_holds"], f["ours_holds"]
    assert th["trial_runs"] == to["trial_runs"] == 2 and to["runs"] == 3
    assert to["nested"] and not th["nested"]
    assert th["params_per_trial"] > 100 and th["params_per_trial_min"] == 0
    assert th["searched_params"] == {"lr": 1, "frozen_layers": 0}  # learning_rate in the first trial's run only
    assert to["params_per_trial_min"] > 0 and to["searched_params"] == {"lr": 2, "frozen_layers": 2}
    assert th["artifacts_per_trial"] == th["datasets"] == 0 < to["artifacts_per_trial"] and to["datasets"] == 2
    rows = text_rows(f)
    assert len(rows) == 2 and "lr in 1 of 2" in rows[1][1] and "frozen_layers in 0 of 2" in rows[1][1]


CHECKS = {"speed": speed, "startup": startup, "load": load, "peer": peer, "text": text_peer, "methods": methods}


def test_the_text_peer_freezes_the_same_stages_as_ours():
    """The peer's model_init freezes what our frozen_layers freezes: the embeddings, then the same block groups."""
    from transformers import AutoModelForSequenceClassification

    from benchmarks.text_peer import hf_stages
    from fine_tune.learn.encoders import encoder_stages, model_dir

    minilm = "hf:sentence-transformers/all-MiniLM-L6-v2"
    ours, _ = encoder_stages(minilm)  # the real weights, so that equal tensors mean the same layers
    theirs = hf_stages(AutoModelForSequenceClassification.from_pretrained(str(model_dir(minilm)), num_labels=4))
    assert len(theirs) == len(ours) == 5
    for a, b in zip(ours, theirs):
        assert sorted(p.shape for p in a.parameters()) == sorted(p.shape for p in b.parameters())
        assert all(any(p.equal(q) for q in b.parameters()) for p in a.parameters())  # the same layers


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


def test_spread_drops_figures_a_run_could_not_give():
    assert spread([3.0, float("nan"), 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([float("nan")])["n"] == 0


def test_timed_counts_the_seconds_spent_in_the_wrapped_objects_calls():
    class Slow:
        name = "inner"

        def wait(self, seconds):
            import time
            time.sleep(seconds)
            return seconds

    timed = Timed(Slow())
    assert timed.wait(0.05) == 0.05 and timed.name == "inner"
    assert timed.seconds >= 0.05
