"""`make curve` on a tiny real setting: every (budget, arm, seed) run is tracked, a second call resumes, and the report's
table is the runs' own numbers with intervals over seeds."""
import re

import numpy as np
import pytest
from helpers import runs_of, study_in, tiny_sweep
from scipy import stats as scipy_stats

from analysis import stats
from analysis.__main__ import main as analysis_main
from fine_tune.config import Config
from fine_tune.errors import ConfigError
from fine_tune.study.efficiency import run_curve
from fine_tune.study.sweep import run_sweep


def curve_config(tmp_path, backbone, **kw) -> Config:
    fields = dict(study="tiny-curve", classes=[5, 6, 7, 8, 9], val_per_class=20, test_per_class=40, epochs=2,
                  head_size=16, pretrained=backbone, runs_dir=str(tmp_path / "runs"),
                  curve={"budgets": [5, 10], "seeds": 2})
    fields.update(kw)
    return Config(**fields)


@pytest.mark.slow
def test_every_point_is_a_tracked_run_and_the_report_shows_their_numbers(tmp_path, tiny_backbone):
    cfg = curve_config(tmp_path, tiny_backbone[0])
    assert run_curve(cfg, log=lambda s: None) == 2 * 3 * 2
    assert run_curve(cfg, log=lambda s: None) == 0  # resumed: nothing left to run
    runs = runs_of(cfg.runs_dir, "tiny-curve-curve")
    curve = runs[runs["tags.fine_tune.role"] == "curve"]
    assert len(curve) == 12 and set(curve.status) == {"FINISHED"}
    assert set(curve["tags.fine_tune.arm"]) == {"fine-tuned", "from scratch", "linear probe"}
    probe = curve[curve["tags.fine_tune.arm"] == "linear probe"]
    assert set(probe["params.frozen_layers"]) == {"2"} and set(probe["params.trainable_params"]) == {"325"}
    scratch = curve[curve["tags.fine_tune.arm"] == "from scratch"]
    assert set(scratch["params.pretrained"]) == {"none"}
    assert set(curve[curve["tags.fine_tune.arm"] == "fine-tuned"]["params.pretrained"]) == {tiny_backbone[0]}
    assert set(curve["params.batch_size"]) == {"6", "12"}  # a quarter of 25 and of 50 labeled images

    out = tmp_path / "reports"
    assert analysis_main(["curve", "--study", "tiny-curve", "--runs-dir", cfg.runs_dir, "--out", str(out)]) == 0
    md = (out / "tiny-curve-curve" / "report.md").read_text()
    assert (out / "tiny-curve-curve" / "curve_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    for budget, arm in ((5, "linear probe"), (10, "fine-tuned")):
        values = curve[(curve["tags.fine_tune.arm"] == arm) & (curve["tags.fine_tune.budget"] == str(budget))]
        acc = values["metrics.test/accuracy"].to_numpy()
        half = scipy_stats.t.ppf(0.975, 1) * acc.std(ddof=1) / np.sqrt(2)
        row = re.search(rf"\| {budget} \| {arm} \| 2 \| ([0-9.]+) \[([0-9.-]+), ([0-9.]+)\]", md)
        assert row, md
        assert [float(x) for x in row.groups()] == pytest.approx([acc.mean(), acc.mean() - half, acc.mean() + half],
                                                                  abs=1e-4)
    # which hyperparameters the fine-tuned arm had, and where from (no study had run)
    assert ("- fine-tuned arm's hyperparameters: lr 0.001, frozen_layers 0, head_size 16 (the experiment's own: study "
            "tiny-curve had no complete trial)") in md
    # a best arm is named only where its interval is apart from every other arm's
    overlapping = 0
    for budget in (5, 10):
        line = next(ln for ln in md.splitlines() if ln.startswith(f"- {budget} per class:"))
        ci = {arm: stats.mean_ci(curve[(curve["tags.fine_tune.arm"] == arm) & (curve["tags.fine_tune.budget"] ==
                                                                               str(budget))]["metrics.test/accuracy"])
              for arm in ("fine-tuned", "from scratch", "linear probe")}
        top = max(ci, key=lambda arm: ci[arm][0])
        tied = [arm for arm in ci if arm != top and not stats.apart(ci[top], ci[arm])]
        overlapping += bool(tied)
        assert line.endswith(f"no difference between {top} and {' or '.join(tied)} (intervals overlap)" if tied else
                             f"best: {top} (its interval apart from every other arm's)"), line
    assert overlapping  # two seeds: wide intervals, the case in which a "best" arm used to be named anyway


@pytest.mark.slow
def test_the_fine_tuned_arm_takes_and_names_the_studys_best_trial(tmp_path, tiny_backbone):
    run_sweep(tiny_sweep(tmp_path / "runs", tiny_backbone[0], "tiny-curve", 2), progress=False, log=lambda s: None)
    best = study_in(tmp_path / "runs", "tiny-curve").best_trial
    cfg = curve_config(tmp_path, tiny_backbone[0], curve={"budgets": [5], "seeds": 1})
    assert run_curve(cfg, log=lambda s: None) == 3
    runs = runs_of(cfg.runs_dir, "tiny-curve-curve")
    tuned = runs[runs["tags.fine_tune.arm"] == "fine-tuned"].iloc[0]
    assert {k: tuned[f"params.{k}"] for k in best.params} == {k: str(v) for k, v in best.params.items()}
    said = (f"lr {best.params['lr']:.3g}, frozen_layers {best.params['frozen_layers']}, head_size "
            f"{best.params['head_size']} (the best trial ({best.number}) of study tiny-curve)")
    assert tuned["tags.fine_tune.tuned_by"] == said
    out = tmp_path / "reports"
    assert analysis_main(["curve", "--study", "tiny-curve", "--runs-dir", cfg.runs_dir, "--out", str(out)]) == 0
    md = (out / "tiny-curve-curve" / "report.md").read_text()
    assert f"- fine-tuned arm's hyperparameters: {said}" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("- 5 per class:"))
    assert "best:" not in line and "no difference between" in line  # one seed: no interval, no winner


def test_a_curve_needs_a_pretrained_backbone(tmp_path):
    with pytest.raises(ConfigError, match="set pretrain:, weights: or pretrained:"):
        run_curve(curve_config(tmp_path, None), log=lambda s: None)
