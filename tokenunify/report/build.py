"""The report stage: one self-contained HTML page comparing the pretraining experiments.

Sections (see :func:`build_report`):

1. datasets, experiments and the run's config (YAML);
2. per test dataset, a score table laid out like the TokenUnify paper's Table 1 (VOI_M, VOI_S,
   VOI in bits, ARAND; lower is better) at the threshold chosen on the validate datasets (the
   headline), at a fixed one, and at the best one on the test set (an oracle, for reference),
   and the VOI split/merge curve over agglomeration thresholds;
3. pretraining and fine-tuning loss curves;
4. middle z-section views (raw, affinities, segmentation, ground truth, largest split / merge);
5. per-rule run times from Snakemake benchmark files.

Missing optional inputs (training logs, zarr volumes, benchmarks) give an italic note in their
section and a logged warning; missing or malformed ``metrics.csv`` files are errors.
"""

from __future__ import annotations

import json
import logging
import os
import time
from html import escape
from pathlib import Path

import pandas as pd
import yaml

from tokenunify.report import figures, page, seeds, tables
from tokenunify.report.inputs import ReportInputs
from tokenunify.report.sections import error_caption, load_section

log = logging.getLogger(__name__)

TITLE = "TokenUnify segmentation report"


def _anchor(*parts: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else "_" for ch in p) for p in parts)


def _intro(inputs: ReportInputs, config: dict, experiments: list[str],
           test_datasets: list[str], runs: dict) -> str:
    body = page.para(f"Experiments: {', '.join(experiments)}. Test datasets: "
                     f"{', '.join(test_datasets)}.", "meta")
    body += "<h3>Datasets</h3>\n" + page.simple_table(tables.datasets_table(config, inputs))
    body += "<h3>Experiments</h3>\n" + page.simple_table(tables.experiments_table(
        config, experiments, runs))
    plain = json.loads(json.dumps(config, default=str))  # tuples -> lists, paths -> strings
    dump = yaml.safe_dump(plain, sort_keys=False, default_flow_style=None, allow_unicode=True)
    body += ("<details><summary>Run configuration (YAML)</summary>\n<pre>"
             f"{escape(dump)}</pre></details>\n")
    return page.section("setup", "Datasets, experiments and configuration", body)


def _selection(validated: dict[str, float], experiments: list[str],
               validate_datasets: list[str]) -> str:
    """One sentence on how the headline threshold was chosen."""
    if not validated:
        return page.para("No validate dataset was scored, so no threshold was chosen on held-out "
                         "data: the table shows the fixed threshold and, for reference only, the "
                         "best threshold on the test data itself (which overstates the score).")
    chosen = ", ".join(f"{e} {validated[e]:g}" for e in experiments if e in validated)
    return page.para(f"Thresholds chosen on the validate datasets ({', '.join(validate_datasets)}"
                     f"; minimum mean VOI), one per experiment: {chosen}. The test data was "
                     "scored at every threshold of the sweep but selected on at none: the first "
                     "column block is the headline; the last block (best on test) is an oracle "
                     "shown for reference only.")


def _scores(metrics: pd.DataFrame, experiments: list[str], test_datasets: list[str],
            colors: dict[str, str], fixed_threshold: float, validated: dict[str, float],
            validate_datasets: list[str]) -> str:
    body = _selection(validated, experiments, validate_datasets)
    body += page.para("VOI_M = VOI merge (under-segmentation), VOI_S = VOI split "
                     "(over-segmentation), VOI = VOI_M + VOI_S, all in bits; ARAND = 1 − Rand "
                     "F-score. Lower is better for all; the best value of each column is bold. "
                     "'segments' counts the segments that overlap labelled ground truth. "
                     "NERL (when the ground truth was skeletonized) = expected run length along "
                     "the ground-truth skeletons divided by the ground truth's own, 0 to 1, "
                     "higher is better (the best value is bold); metrics.csv also holds the ERL "
                     "in nm and the skeleton edges split and the segments merging skeletons.")
    for ds in test_datasets:
        table = tables.score_table(metrics, ds, experiments, fixed_threshold, validated)
        body_ds = page.score_table_html(table, fixed_threshold)
        settings = tables.eval_settings(metrics, ds)
        body_ds += page.para("Ground-truth preparation (from metrics.csv): " + "; ".join(
            f"{k} = {', '.join(f'{v:g}' for v in vals) or '—'}" for k, vals in settings.items())
            + " (voxels).")
        uri = figures.voi_curve(metrics[metrics["dataset"] == ds], experiments, colors,
                                f"{ds}: VOI split vs merge over thresholds")
        body_ds += page.figure(uri, f"{ds}: VOI split (x) against VOI merge (y), one line per "
                               "experiment over the agglomeration thresholds (labels on the "
                               "points); ★ marks the threshold of minimum VOI; dotted lines are "
                               "iso-VOI. Closer to the origin is better.", f"VOI curve {ds}")
        uri = figures.nerl_curve(metrics[metrics["dataset"] == ds], experiments, colors,
                                 f"{ds}: NERL over thresholds")
        if uri:
            rule = ", ".join(sorted(set(metrics.loc[metrics["dataset"] == ds, "erl_merge_rule"]
                                        .dropna().astype(str))))
            body_ds += page.figure(uri, f"{ds}: normalised expected run length along the "
                                   f"ground-truth skeletons against the threshold (merge rule: "
                                   f"{rule}); ★ marks each experiment's maximum. Higher is "
                                   "better.", f"NERL curve {ds}")
        body += page.section(_anchor("scores", ds), f"Test dataset {ds}", body_ds, level=3)
    return page.section("scores", "Segmentation scores", body)


def _seeds(metrics: pd.DataFrame, runs: dict, test_datasets: list[str], validated: dict,
           fixed_threshold: float, baselines: list[str]) -> str:
    """Experiments over seeds: mean ± sd per experiment, every seed's scores, paired
    comparisons with the baselines and one sentence per comparison."""
    experiments = list(dict.fromkeys(exp for exp, _ in runs.values()))
    scores = seeds.run_scores(metrics, runs, validated, fixed_threshold)
    how = ("the threshold chosen on the validate datasets for each run" if validated
           else f"the fixed threshold {fixed_threshold:g}")
    body = page.para(f"Each run is scored at {how}. Mean ± sample standard deviation over seeds; "
                     "VOI in bits, lower is better. Comparisons pair the runs by seed: mean "
                     "difference in VOI with a 95 % Student-t interval, and the relative change "
                     "in percent (mean ± 95 % half-width).")
    for ds in test_datasets:
        table = seeds.seed_table(scores, ds, experiments)
        shown = pd.DataFrame({"experiment": table.index, "seeds": table["seeds"]})
        for name in seeds.METRICS.values():
            shown[name] = [f"{m:.3f} ± {sd:.3f}" if pd.notna(sd) else f"{m:.3f}"
                           for m, sd in zip(table[f"{name} mean"], table[f"{name} sd"],
                                            strict=True)]
        part = page.simple_table(shown.reset_index(drop=True), {"seeds": 0})
        per_seed = scores[scores["dataset"] == ds].drop(columns=["dataset"])
        part += ("<details><summary>Every seed</summary>\n"
                 + page.simple_table(per_seed, {"seed": 0, "threshold": 3, **{
                     c: 3 for c in seeds.METRICS}}) + "</details>\n")
        comp = seeds.paired(scores, ds, experiments, baselines) if baselines else None
        if comp is not None and len(comp):
            part += "<ul>" + "".join(f"<li>{escape(seeds.sentence(r, ds))}</li>"
                                     for _, r in comp.iterrows()) + "</ul>\n"
            part += page.simple_table(comp.drop(columns=["significant"]), {
                "seeds": 0, "d_mean": 3, "d_low": 3, "d_high": 3, "rel_mean": 1, "rel_half": 1})
        elif baselines:
            part += page.note("No experiment shares 2 or more seeds with a baseline.")
        body += page.section(_anchor("seeds", ds), f"Test dataset {ds}", part, level=3)
    return page.section("seeds", "Experiments over seeds", body)


def _curricula(logs: dict, runs: dict) -> str:
    """Loss per task and curriculum weights of each pretraining run that has tasks (the first
    run of an experiment with seeds: the curriculum does not depend on the seed)."""
    out, seen = "", set()
    for run, df in logs.items():
        exp = runs.get(run, (run, None))[0]
        if exp in seen:
            continue
        uri = figures.curriculum(df, run)
        if uri:
            seen.add(exp)
            out += page.figure(uri, f"{run}: pretraining loss of each task (left, log scale) and "
                               "the curriculum's weights of the tasks over the steps (right).",
                               f"curriculum {run}")
    return out


def _training(inputs: ReportInputs, experiments: list[str], colors: dict[str, str],
              runs: dict) -> str:
    body = ""
    for stage, what in (("pretrain", "Self-supervised pretraining"), ("finetune", "Fine-tuning")):
        logs, missing = tables.read_training_logs(inputs, experiments, stage)
        part = page.notes(missing)
        uri = figures.loss_curves(logs, colors, stage)
        cap = (f"{what}: training loss per logged step (log scale), one line per experiment"
               + ("; right: validation VOI (bits) of the checkpoints." if stage == "finetune"
                  else "."))
        part += page.figure(uri, cap, f"{stage} loss") if uri else page.note(
            f"No {stage} loss curve to draw.")
        if stage == "pretrain":
            part += _curricula(logs, runs)
        body += page.section(_anchor("training", stage), what, part, level=3)
    return page.section("training", "Training curves", body)


def _views(inputs: ReportInputs, metrics: pd.DataFrame, experiments: list[str],
           test_datasets: list[str], validated: dict[str, float]) -> str:
    which = "threshold chosen on validation" if validated else "best threshold"
    body = page.para(f"Middle z-section of each test volume at each experiment's {which}. "
                     "Segment and GT colours are random per id (0 black). The largest split and "
                     "merge are computed over the whole volume against the labels as stored (label "
                     "0 ignored, without the gt_min_size / gt_border_width preparation of the "
                     "scores); the two bottom-right panels paint them over the raw section.")
    for ds in test_datasets:
        part = ""
        for exp in experiments:
            t = tables.chosen_threshold(metrics, exp, ds, validated)
            sec = load_section(inputs, exp, ds, t)
            uri = figures.section_views(sec, f"{exp} on {ds} (threshold {t:.3f})", t)
            part += page.notes([f"{exp}: {n}" for n in sec.notes])
            part += page.figure(uri, f"{exp} on {ds}, z = {sec.z}: {error_caption(sec)}",
                                f"section {exp} {ds}")
        body += page.section(_anchor("views", ds), f"Test dataset {ds}", part, level=3)
    return page.section("views", "Section views", body)


def _neuroglancer(inputs: ReportInputs, out: Path, experiments: list[str],
                  test_datasets: list[str]) -> str:
    """Where each result's Neuroglancer export is and the command that opens it."""
    if not inputs.neuroglancer:
        return ""
    rows, body = [], ""
    for ds in test_datasets:
        folders = []
        for exp in experiments:
            folder = Path(inputs.neuroglancer.get(exp, {}).get(ds, ""))
            manifest = folder / "layers.json"
            if not str(folder) or not manifest.is_file():
                continue
            m = json.loads(manifest.read_text())
            href = os.path.relpath(manifest.resolve(), out.parent.resolve())
            rows.append({"experiment": exp, "dataset": ds, "threshold": m["threshold"],
                         "layers": ", ".join(m["layers"]),
                         "meshes": sum(v.get("meshes", 0) for v in m["layers"].values()),
                         "folder": f'<a href="{escape(href)}">{escape(str(folder))}</a>'})
            folders.append(str(folder))
        if folders:
            body += page.para(f"{ds}: <code>tokenunify view {escape(' '.join(folders))}"
                              "</code>", cls="")
    if not rows:
        return ""
    intro = page.para("Each result is exported as Neuroglancer precomputed layers (raw, "
                      "affinities, the segmentation at the threshold of the section views, "
                      "ground truth, with meshes). Open them with the command under the table, "
                      "run from the workflow's directory: it serves the folders and prints a "
                      "local Neuroglancer link (the chunk files are gzip-compressed, so a plain "
                      "static file server does not do; <code>igneous view</code> does).")
    table = pd.DataFrame(rows)
    return page.section("neuroglancer", "Neuroglancer",
                        intro + page.simple_table(table, {"threshold": 3, "meshes": 0},
                                                  markup=("folder",)) + body)


def _runtimes(benchmarks: str | None) -> str:
    bench = tables.read_benchmarks(benchmarks)
    if bench.empty:
        log.warning("no benchmark files under %s", benchmarks)
        return page.section("runtimes", "Run times", page.note(
            f"No benchmark files found under {benchmarks}."))
    table = tables.runtime_table(bench)
    body = page.simple_table(table, {"jobs": 0, "total s": 1, "max RSS (MB)": 0})
    body += page.figure(figures.runtime_bars(table), "Total wall time per rule (sum over its "
                        "jobs, from Snakemake benchmark files).", "run times")
    jobs = bench.rename(columns={"s": "wall s", "max_rss": "max RSS (MB)"})
    body += ("<details><summary>Per job</summary>\n"
             + page.simple_table(jobs, {"wall s": 1, "max RSS (MB)": 0}) + "</details>\n")
    return page.section("runtimes", "Run times", body)


def build_report(inputs: ReportInputs, out: Path, experiments: list[str], test_datasets: list[str],
                 config: dict, fixed_threshold: float = 0.5,
                 validate_datasets: list[str] | None = None, runs: dict | None = None,
                 baselines: list[str] | None = None) -> Path:
    """Write one self-contained HTML page (images embedded as base64 PNG) to ``out``.

    The page is written to a temporary name in the same folder, then moved into place with
    :func:`os.replace`, so ``out`` is never half-written.

    Args:
        inputs: every file to read, by role (:class:`~tokenunify.report.inputs.ReportInputs`).
        out: the HTML file to write.
        experiments: experiment names, in table/legend order.
        test_datasets: test dataset names.
        config: the validated Snakemake config (``datasets``, ``experiments``, ...).
        fixed_threshold: agglomeration threshold of the fixed score block (the nearest
            available threshold of each experiment is used).
        validate_datasets: datasets whose ``metrics.csv`` choose each experiment's threshold
            (minimum mean VOI); the test scores at that threshold are the headline block.
        runs: run name (the names in ``experiments``) -> (experiment, seed); with seeds, a
            section aggregates each experiment over its seeds.
        baselines: experiments the others are compared with, paired over seeds.

    Returns:
        ``out``.

    Raises:
        ValueError: a ``metrics.csv`` of a requested experiment x dataset is missing or lacks a
            required column (the message names the file).
    """
    out = Path(out)
    experiments, test_datasets = list(experiments), list(test_datasets)
    metrics = tables.read_metrics(inputs, experiments, test_datasets)
    validate_datasets = list(validate_datasets or [])
    validated = (tables.validated_thresholds(tables.read_metrics(inputs, experiments,
                                                                 validate_datasets))
                 if validate_datasets else {})
    colors = {e: f"C{i % 10}" for i, e in enumerate(experiments)}
    log.info("report: %d experiments x %d test datasets", len(experiments), len(test_datasets))
    runs = {k: tuple(v) for k, v in (runs or {}).items()}
    seeded = any(seed is not None for _, seed in runs.values())
    toc = [("setup", "Datasets, experiments and configuration"), ("scores", "Segmentation scores"),
           *([("seeds", "Experiments over seeds")] if seeded else []),
           ("training", "Training curves"), ("views", "Section views"),
           *([("neuroglancer", "Neuroglancer")] if inputs.neuroglancer else []),
           ("runtimes", "Run times")]
    body = (_intro(inputs, config, experiments, test_datasets, runs)
            + _scores(metrics, experiments, test_datasets, colors, fixed_threshold, validated,
                      validate_datasets)
            + (_seeds(metrics, runs, test_datasets, validated, fixed_threshold,
                      list(baselines or [])) if seeded else "")
            + _training(inputs, experiments, colors, runs)
            + _views(inputs, metrics, experiments, test_datasets, validated)
            + _neuroglancer(inputs, out, experiments, test_datasets)
            + _runtimes(inputs.benchmarks))
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    html = page.page(TITLE, generated, toc, body)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%.1f kB)", out, len(html) / 1024)
    return out
