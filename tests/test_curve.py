"""`make curve` on a tiny real setting: every (budget, arm, seed) run is tracked, a second call resumes, and the report's
table is the runs' own numbers with intervals over seeds."""
import re

import numpy as np
import pytest
from helpers import runs_of
from scipy import stats as scipy_stats

from analysis.__main__ import main as analysis_main
from fine_tune.config import Config
from fine_tune.errors import ConfigError
from fine_tune.study.efficiency import run_curve


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


def test_a_curve_needs_a_pretrained_backbone(tmp_path):
    with pytest.raises(ConfigError, match="set pretrain:, weights: or pretrained:"):
        run_curve(curve_config(tmp_path, None), log=lambda s: None)
