"""Experiments over seeds: runs, mean ± sd, paired comparisons with a 95 % interval, and the
sentence that states the result, checked against numbers recomputed here with scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tokenunify.config import ConfigError, check_config
from tokenunify.report import seeds
from tokenunify.runs import Run, run_of, runs, stage_settings

VOI = {("tokenunify", 0): 1.0, ("tokenunify", 1): 1.2, ("tokenunify", 2): 0.9,
       ("none", 0): 1.5, ("none", 1): 1.6, ("none", 2): 1.4,
       ("mae", 0): 1.5, ("mae", 1): 1.3, ("mae", 2): 1.5}


def metrics() -> pd.DataFrame:
    """Test metrics of 3 experiments x 3 seeds at thresholds 0.3 / 0.5 (VOI above at 0.5)."""
    rows = []
    for (exp, seed), voi in VOI.items():
        for t, v in ((0.3, voi + 1.0), (0.5, voi)):
            rows.append({"experiment": f"{exp}-seed{seed}", "dataset": "test", "threshold": t,
                         "voi_split": v / 4, "voi_merge": 3 * v / 4, "voi": v, "arand": v / 10,
                         "n_segments": 5, "gt_min_size": 0, "gt_border_width": 0})
    return pd.DataFrame(rows)


def test_runs_are_experiments_times_seeds():
    cfg = {"experiments": {"b": {}, "a": {}}, "seeds": [2, 0],
           "pretrain": {"seed": 9, "steps": 1}, "finetune": {"seed": 9}}
    assert runs(cfg) == [Run("a-seed2", "a", 2), Run("a-seed0", "a", 0), Run("b-seed2", "b", 2),
                         Run("b-seed0", "b", 0)]
    assert stage_settings(cfg, "b-seed0", "pretrain") == {"seed": 0, "steps": 1}
    assert cfg["pretrain"]["seed"] == 9  # the config is not changed
    assert runs({"experiments": {"a": {}}, "seeds": None}) == [Run("a", "a")]
    with pytest.raises(KeyError, match="no run 'c-seed0'"):
        run_of(cfg, "c-seed0")


def test_mean_sd_and_paired_comparison_recomputed():
    runs_ = {f"{e}-seed{s}": (e, s) for e, s in VOI}
    validated = {r: 0.5 for r in runs_}
    scores = seeds.run_scores(metrics(), runs_, validated, fixed_threshold=0.3)
    assert set(scores["threshold"]) == {0.5} and set(scores["chosen_on"]) == {"validation"}
    table = seeds.seed_table(scores, "test", ["tokenunify", "mae", "none"])
    tu = [VOI[("tokenunify", s)] for s in range(3)]
    assert table.loc["tokenunify", "VOI mean"] == pytest.approx(np.mean(tu))
    assert table.loc["tokenunify", "VOI sd"] == pytest.approx(np.std(tu, ddof=1))
    assert table.loc["none", "ARAND mean"] == pytest.approx(1.5 / 10)
    comp = seeds.paired(scores, "test", ["tokenunify", "mae", "none"], ["none"]).set_index(
        "experiment")
    d = np.array(tu) - np.array([VOI[("none", s)] for s in range(3)])
    lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    row = comp.loc["tokenunify"]
    assert (row["d_mean"], row["d_low"], row["d_high"]) == pytest.approx((d.mean(), lo, hi))
    rel = 100 * d / np.array([1.5, 1.6, 1.4])
    assert row["rel_mean"] == pytest.approx(rel.mean())
    assert row["verdict"] == "lower (better)" and bool(row["significant"])
    text = seeds.sentence(comp.reset_index().iloc[0], "test")
    assert text.startswith(f"tokenunify lowers test VOI by {abs(rel.mean()):.1f} % ± ")
    assert "3 seeds" in text
    # mae against none: differences 0, -0.3, +0.1 -> the interval includes 0
    mae = comp.loc["mae"]
    assert not mae["significant"] and mae["verdict"] == "no significant difference"
    assert "shows no significant difference" in seeds.sentence(comp.reset_index().iloc[1], "t")
    # worse: none against tokenunify
    worse = seeds.paired(scores, "test", ["none"], ["tokenunify"]).iloc[0]
    assert worse["verdict"] == "higher (worse)"
    assert "raises test VOI by" in seeds.sentence(worse, "test")


def config(**extra) -> dict:
    src = "synthetic://em?shape=16,64,64&seed=1"
    return {"datasets": {"d": {"raw": {"source": src, "key": "raw"},
                               "labels": {"source": src, "key": "labels"},
                               "roles": ["pretrain", "train"]}},
            "experiments": {"none": {"pretraining": "none"}, "mae": {"pretraining": "mae"}},
            "tokenize": {"crop": [16, 32, 32]}, "finetune": {"crop": [16, 32, 32]}, **extra}


@pytest.mark.parametrize("extra, message", [
    ({"seeds": [0, 0, 1]}, r"seeds: \[0, 0, 1\] repeats a value; give distinct values"),
    ({"seeds": [0, "a"]}, r"seeds\[1\]: 'a' is not of type 'integer'"),
    ({"seeds": 3}, r"seeds: 3 is not of type 'array', 'null'"),
    ({"seeds": [0], "report": {"baselines": ["none"]}},
     r"report.baselines \['none'\] asks for paired intervals over seeds, but there is 1 seed"),
    ({"report": {"baselines": ["none"]}}, r"but there are no seeds"),
    ({"seeds": [0, 1], "report": {"baselines": ["random"]}},
     r"report.baselines: \['random'\] are not declared experiments"),
])
def test_bad_seeds_and_baselines_are_named(extra, message):
    check_config(config(seeds=[0, 1], report={"baselines": ["none"]}))
    with pytest.raises(ConfigError, match=message):
        check_config(config(**extra))
