"""Tables of the report: scores, datasets, experiments, run times, training logs (pandas).

Every reader takes its files from :class:`~tokenunify.report.inputs.ReportInputs`:

- ``metrics``: one ``metrics.csv`` per run and dataset, one row per agglomeration threshold (VOI
  in bits, ARAND = 1 - Rand F-score; lower is better for all). A missing file or column is an
  error (:class:`ValueError` naming the file), because the report would otherwise silently
  compare fewer methods.
- ``training``: model folders with their ``metrics.jsonl`` logs; a missing log is only a note.
- ``benchmarks``: ``{rule}/**/*.tsv`` Snakemake benchmark files (seconds, MB).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from tokenunify.metrics import COLUMNS, ERL_COLUMNS, TEXT_COLUMNS
from tokenunify.report.inputs import ReportInputs

log = logging.getLogger(__name__)

REQUIRED = tuple(c for c in COLUMNS if c not in ERL_COLUMNS)  # in every metrics.csv
# metrics.csv column -> column name shown in the paper-style table (TokenUnify Table 1 order)
SCORE_COLUMNS = {"voi_merge": "VOI_M", "voi_split": "VOI_S", "voi": "VOI", "arand": "ARAND"}
BENCH_COLUMNS = ("s", "max_rss")


def read_metrics(inputs: ReportInputs, experiments: list[str], datasets: list[str]
                 ) -> pd.DataFrame:
    """All ``metrics.csv`` files of ``experiments`` x ``datasets`` as one tidy frame.

    Returns:
        rows (experiment, dataset, threshold) sorted, with every column of ``COLUMNS`` (the
        ERL ones empty for files written without them) and any extra the files hold; the
        ``experiment``/``dataset`` columns are those the file was declared for.

    Raises:
        ValueError: a file is missing, unreadable, empty or lacks a required column (the message
            names the file).
    """
    frames = []
    for exp in experiments:
        for ds in datasets:
            path = inputs.path("metrics", exp, ds)
            if not path.is_file():
                raise ValueError(f"missing metrics file for experiment {exp!r}, dataset {ds!r}: "
                                 f"{path}")
            try:
                df = pd.read_csv(path)
            except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
                raise ValueError(f"cannot read metrics file {path}: {e}") from e
            missing = [c for c in REQUIRED if c not in df.columns]
            if missing:
                raise ValueError(f"metrics file {path} lacks required column(s) "
                                 f"{', '.join(missing)} (has: {', '.join(map(str, df.columns))})")
            if df.empty:
                raise ValueError(f"metrics file {path} has no rows")
            for col, want in (("experiment", exp), ("dataset", ds)):
                found = set(df[col].astype(str))
                if found != {want}:
                    log.warning("%s: column %s holds %s, expected %r; using %r", path, col,
                                sorted(found), want, want)
                df[col] = want
            frames.append(df.reindex(columns=list(dict.fromkeys(COLUMNS + list(df.columns)))))
    out = pd.concat(frames, ignore_index=True)
    for col in COLUMNS:
        if col not in TEXT_COLUMNS:
            out[col] = pd.to_numeric(out[col], errors="coerce")
    return out.sort_values(["experiment", "dataset", "threshold"], ignore_index=True)


def best_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The row minimising VOI for each (experiment, dataset); all-NaN VOI keeps the first row.

    Returns:
        one row per (experiment, dataset), indexed by both, all metric columns.
    """
    rows = []
    for _, g in metrics.groupby(["experiment", "dataset"], sort=False):
        voi = g["voi"].to_numpy(float)
        rows.append(g.iloc[int(np.nanargmin(voi)) if np.isfinite(voi).any() else 0])
    return pd.DataFrame(rows).set_index(["experiment", "dataset"])


def fixed_rows(metrics: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The row at the threshold nearest ``threshold`` for each (experiment, dataset)."""
    rows = []
    for _, g in metrics.groupby(["experiment", "dataset"], sort=False):
        rows.append(g.iloc[int(np.argmin(np.abs(g["threshold"].to_numpy(float) - threshold)))])
    return pd.DataFrame(rows).set_index(["experiment", "dataset"])


def validated_thresholds(validation: pd.DataFrame) -> dict[str, float]:
    """Per experiment, the threshold minimising the mean VOI over the validate datasets (the
    thresholds every validate dataset was scored at; ties: the lowest threshold).

    Args:
        validation: metrics rows of the validate datasets (:func:`read_metrics`).
    """
    out = {}
    for exp, g in validation.groupby("experiment", sort=False):
        per = g.pivot_table(index="threshold", columns="dataset", values="voi", aggfunc="first")
        mean = per.dropna().mean(axis=1)
        if len(mean):
            out[str(exp)] = float(mean.idxmin())
    return out


def selected_rows(metrics: pd.DataFrame, thresholds: dict[str, float]) -> pd.DataFrame:
    """The row of each (experiment, dataset) at its experiment's threshold in ``thresholds``
    (nearest available); experiments without one are left out."""
    rows = []
    for (exp, _), g in metrics.groupby(["experiment", "dataset"], sort=False):
        if exp in thresholds:
            t = g["threshold"].to_numpy(float)
            rows.append(g.iloc[int(np.argmin(np.abs(t - thresholds[exp])))])
    if not rows:
        return pd.DataFrame(columns=list(metrics.columns)).set_index(["experiment", "dataset"])
    return pd.DataFrame(rows).set_index(["experiment", "dataset"])


def chosen_threshold(metrics: pd.DataFrame, experiment: str, dataset: str,
                     validated: dict[str, float] | None) -> float:
    """The threshold the report shows (and the export writes) ``experiment``'s segmentation of
    ``dataset`` at: the one chosen on the validate datasets (``validated``, nearest computed),
    or without validate datasets the one of minimum VOI on ``dataset`` itself."""
    rows = selected_rows(metrics, validated) if validated else best_rows(metrics)
    if (experiment, dataset) not in rows.index:
        raise ValueError(f"no metrics of experiment {experiment!r} on dataset {dataset!r} to "
                         f"choose a threshold from")
    return float(rows.loc[(experiment, dataset), "threshold"])


def score_table(metrics: pd.DataFrame, dataset: str, experiments: list[str],
                fixed_threshold: float, validated: dict[str, float] | None = None
                ) -> pd.DataFrame:
    """The paper-style score table of one test dataset.

    Args:
        validated: per experiment, the threshold chosen on the validate datasets
            (:func:`validated_thresholds`); None or empty: no such block.

    Returns:
        index = experiments (in the given order); columns a two-level index
        ``(block, name)`` with blocks ``"validated"`` (the threshold chosen on validation data:
        the headline, only when ``validated`` is given), ``"fixed"`` (threshold nearest
        ``fixed_threshold``) and ``"best"`` (the threshold minimising test VOI: an oracle,
        for reference only), and names ``threshold``, ``VOI_M``, ``VOI_S``, ``VOI`` (bits),
        ``ARAND``, ``segments`` (number of segments) and, when the dataset's rows have
        skeleton scores, ``NERL``.
    """
    sub = metrics[metrics["dataset"] == dataset]
    blocks = [("fixed", fixed_rows(sub, fixed_threshold)), ("best", best_rows(sub))]
    if validated:
        blocks.insert(0, ("validated", selected_rows(sub, validated)))
    parts = {}
    for block, rows in blocks:
        rows = rows.xs(dataset, level="dataset").reindex(experiments)
        cols = {"threshold": rows["threshold"], **{v: rows[k] for k, v in SCORE_COLUMNS.items()},
                "segments": rows["n_segments"]}
        if sub["nerl"].notna().any():  # skeletons were scored
            cols["NERL"] = rows["nerl"]
        parts[block] = pd.DataFrame(cols)
    table = pd.concat(parts, axis=1)
    table.index.name = "experiment"
    return table


def eval_settings(metrics: pd.DataFrame, dataset: str) -> dict[str, list]:
    """Distinct ``gt_min_size`` (voxels) / ``gt_border_width`` (voxels) used for ``dataset``."""
    sub = metrics[metrics["dataset"] == dataset]
    return {c: sorted(sub[c].dropna().unique().tolist()) for c in ("gt_min_size", "gt_border_width")}


def _source_string(spec) -> str:
    if spec is None:
        return ""
    if isinstance(spec, dict):
        src = str(spec.get("source", ""))
        return f"{src} [{spec['key']}]" if spec.get("key") else src
    return str(spec)


def _voxel_size(inputs: ReportInputs, name: str, spec: dict) -> str:
    vs = spec.get("voxel_size")
    if vs is None and name in inputs.data:
        path = inputs.path("data", name)
        try:
            vs = zarr.open_group(str(path), mode="r")["raw"].attrs.get("voxel_size")
        except (FileNotFoundError, KeyError):
            vs = None
    return " × ".join(f"{float(v):g}" for v in vs) if vs is not None else "—"


def datasets_table(config: dict, inputs: ReportInputs) -> pd.DataFrame:
    """One row per configured dataset: roles, raw/labels sources and voxel size (nm, z × y × x).

    The voxel size comes from the config, else from the downloaded volume's ``raw`` attrs,
    else "—".
    """
    rows = []
    for name, spec in (config.get("datasets") or {}).items():
        spec = spec or {}
        raw = spec.get("raw", spec.get("source"))
        rows.append({"dataset": name, "roles": ", ".join(spec.get("roles") or []),
                     "raw source": _source_string(raw),
                     "labels source": _source_string(spec.get("labels")),
                     "voxel size (nm, z×y×x)": _voxel_size(inputs, name, spec),
                     "description": spec.get("description", "")})
    return pd.DataFrame(rows, columns=["dataset", "roles", "raw source", "labels source",
                                       "voxel size (nm, z×y×x)", "description"])


def experiments_table(config: dict, experiments: list[str], runs: dict | None = None
                      ) -> pd.DataFrame:
    """One row per experiment (run) in the report: pretraining method, seed and description
    from the config; ``runs`` maps run names to (experiment, seed)."""
    conf = config.get("experiments") or {}
    runs = runs or {}
    rows = []
    for e in experiments:
        base, seed = runs.get(e, (e, None))
        rows.append({"experiment": e, "pretraining": (conf.get(base) or {}).get("pretraining", "—"),
                     "seed": "—" if seed is None else seed,
                     "description": (conf.get(base) or {}).get("description", "")})
    return pd.DataFrame(rows, columns=["experiment", "pretraining", "seed", "description"])


def read_jsonl(path: Path) -> pd.DataFrame | None:
    """A ``metrics.jsonl`` training log as a frame sorted by ``step``; None if the file is missing.

    An empty file gives an empty frame; unparsable lines (e.g. a torn last line) are skipped
    with a warning.
    """
    path = Path(path)
    if not path.is_file():
        return None
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON, skipped", path, n)
    df = pd.DataFrame(rows)
    if "step" in df.columns:
        df = df.sort_values("step", ignore_index=True)
    return df


def read_training_logs(inputs: ReportInputs, experiments: list[str], stage: str
                       ) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Logs of one stage (``pretrain`` / ``finetune``) per experiment, and notes on missing ones."""
    logs, notes = {}, []
    for exp in experiments:
        path = inputs.path("training", exp, stage) / "metrics.jsonl"
        df = read_jsonl(path)
        if df is None:
            log.warning("missing %s log: %s", stage, path)
            notes.append(f"{exp}: no {stage} log ({path} is missing).")
        elif df.empty or "loss" not in df.columns:
            notes.append(f"{exp}: the {stage} log is empty"
                         + (" (no pretraining)." if stage == "pretrain" else "."))
        else:
            logs[exp] = df
    return logs, notes


def read_benchmarks(root: str | Path | None) -> pd.DataFrame:
    """Every ``{rule}/**/*.tsv`` file below the benchmarks folder ``root`` as one row per job.

    Returns:
        columns ``rule``, ``job`` (path below the rule folder, no ``.tsv``), ``s`` (wall seconds,
        mean over repeats) and ``max_rss`` (MB, max over repeats; NaN when not measured).
    """
    rows = []
    for path in sorted(Path(root).glob("*/**/*.tsv")) if root is not None else []:
        rel = path.relative_to(root)
        try:
            df = pd.read_csv(path, sep="\t")
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
            log.warning("unreadable benchmark file %s: %s", path, e)
            continue
        if "s" not in df.columns or df.empty:
            log.warning("benchmark file %s has no 's' column or no rows", path)
            continue
        rss = pd.to_numeric(df.get("max_rss", pd.Series(dtype=float)), errors="coerce")
        rows.append({"rule": rel.parts[0], "job": str(rel.with_suffix("").relative_to(rel.parts[0])),
                     "s": float(pd.to_numeric(df["s"], errors="coerce").mean()),
                     "max_rss": float(rss.max()) if rss.notna().any() else float("nan")})
    return pd.DataFrame(rows, columns=["rule", "job", "s", "max_rss"])


def runtime_table(bench: pd.DataFrame) -> pd.DataFrame:
    """Per-rule totals: ``jobs``, ``total s`` (sum of wall seconds), ``max RSS (MB)``."""
    if bench.empty:
        return pd.DataFrame(columns=["rule", "jobs", "total s", "max RSS (MB)"])
    agg = bench.groupby("rule", sort=False).agg(jobs=("job", "size"), total=("s", "sum"),
                                               rss=("max_rss", "max")).reset_index()
    agg = agg.rename(columns={"total": "total s", "rss": "max RSS (MB)"})
    return agg.sort_values("total s", ascending=False, ignore_index=True)
