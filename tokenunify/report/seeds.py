"""Experiments over seeds: mean ± standard deviation, and paired comparisons with baselines.

Each run (an experiment at one seed, :mod:`tokenunify.runs`) is scored on a test dataset at
one threshold: the one chosen on the validate datasets for that run (the report's headline),
else the fixed threshold. Over the seeds of an experiment the report gives mean and sample
standard deviation (ddof 1) of VOI split, VOI merge, VOI (bits) and ARAND.

A comparison of experiment A with baseline B pairs the runs by seed (same seed = same data
order and augmentations in fine-tuning): per seed d = VOI_A - VOI_B (bits) and r = 100 d /
VOI_B (%); the mean of each with a 95 % Student-t interval over the n seeds (n - 1 degrees of
freedom). The difference is called significant when the interval of d excludes 0.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from tokenunify.report.tables import selected_rows

METRICS = {"voi_split": "VOI_S", "voi_merge": "VOI_M", "voi": "VOI", "arand": "ARAND"}


def run_scores(metrics: pd.DataFrame, runs: dict[str, tuple[str, int | None]],
               validated: dict[str, float], fixed_threshold: float) -> pd.DataFrame:
    """One row per (run, dataset): experiment, seed, threshold, how it was chosen, metrics.

    Args:
        metrics: test metrics rows, ``experiment`` holding run names (:func:`read_metrics`).
        runs: run name -> (experiment, seed).
        validated: run name -> threshold chosen on validation (missing: fixed threshold).
    """
    chosen = {r: validated.get(r, fixed_threshold) for r in runs}
    rows = selected_rows(metrics, chosen).reset_index()
    rows = rows.rename(columns={"experiment": "run"})
    rows["experiment"] = [runs[r][0] for r in rows["run"]]
    rows["seed"] = [runs[r][1] for r in rows["run"]]
    rows["chosen_on"] = ["validation" if r in validated else "fixed" for r in rows["run"]]
    return rows[["experiment", "seed", "run", "dataset", "threshold", "chosen_on",
                 *METRICS]].sort_values(["dataset", "experiment", "seed"], ignore_index=True)


def seed_table(scores: pd.DataFrame, dataset: str, experiments: list[str]) -> pd.DataFrame:
    """Experiments x (n seeds, mean and sd of each metric) on one dataset."""
    sub = scores[scores["dataset"] == dataset]
    out = {}
    for exp in experiments:
        g = sub[sub["experiment"] == exp]
        row = {"seeds": len(g)}
        for col, name in METRICS.items():
            v = g[col].to_numpy(float)
            row[f"{name} mean"] = float(np.mean(v)) if len(v) else np.nan
            row[f"{name} sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else np.nan
        out[exp] = row
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index.name = "experiment"
    return table


def _interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95 % Student-t half-width over the values (n >= 2)."""
    n = len(values)
    half = stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
    return float(np.mean(values)), float(half)


def paired(scores: pd.DataFrame, dataset: str, experiments: list[str],
           baselines: list[str]) -> pd.DataFrame:
    """Every experiment against every baseline on one dataset, paired by seed.

    Returns:
        rows (experiment, baseline, seeds, d_mean, d_low, d_high (bits), rel_mean, rel_half
        (%), significant, verdict); pairs with fewer than 2 common seeds are left out.
    """
    sub = scores[scores["dataset"] == dataset]
    voi = sub.pivot_table(index="seed", columns="experiment", values="voi", aggfunc="first")
    rows = []
    for base in baselines:
        for exp in experiments:
            if exp == base or exp not in voi or base not in voi:
                continue
            both = voi[[exp, base]].dropna()
            if len(both) < 2:
                continue
            d = (both[exp] - both[base]).to_numpy(float)
            rel = 100.0 * d / both[base].to_numpy(float)
            d_mean, d_half = _interval(d)
            r_mean, r_half = _interval(rel)
            significant = d_mean - d_half > 0 or d_mean + d_half < 0
            verdict = ("no significant difference" if not significant
                       else "lower (better)" if d_mean < 0 else "higher (worse)")
            rows.append({"experiment": exp, "baseline": base, "seeds": len(both),
                         "d_mean": d_mean, "d_low": d_mean - d_half, "d_high": d_mean + d_half,
                         "rel_mean": r_mean, "rel_half": r_half, "significant": significant,
                         "verdict": verdict})
    return pd.DataFrame(rows, columns=["experiment", "baseline", "seeds", "d_mean", "d_low",
                                       "d_high", "rel_mean", "rel_half", "significant",
                                       "verdict"])


def sentence(row, dataset: str) -> str:
    """The result of one paired comparison in plain words."""
    exp, base = row["experiment"], row["baseline"]
    context = (f"on {dataset}, {row['seeds']} seeds; 95 % interval of the VOI difference "
               f"{row['d_low']:+.3f} to {row['d_high']:+.3f} bits")
    size = f"{abs(row['rel_mean']):.1f} % ± {row['rel_half']:.1f} %"
    if not row["significant"]:
        return (f"{exp} shows no significant difference in test VOI against {base}: "
                f"{row['rel_mean']:+.1f} % ± {row['rel_half']:.1f} % ({context}).")
    if row["d_mean"] < 0:
        return f"{exp} lowers test VOI by {size} against {base} ({context})."
    return f"{exp} raises test VOI by {size} against {base}, i.e. it is worse ({context})."
