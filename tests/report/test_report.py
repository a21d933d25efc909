"""The report stage on a tiny fake ``results/`` tree (2 experiments, 1 test volume 4 x 32 x 32)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

from tokenunify.io.zarrio import create_volume
from tokenunify.metrics import contingency, evaluate
from tokenunify.report import build_report
from tokenunify.report.inputs import ReportInputs
from tokenunify.report.sections import largest_errors
from tokenunify.report.tables import read_metrics, score_table

EXPERIMENTS = ["tokenunify", "none"]
DS = "demo_test"
THRESHOLDS = (0.3, 0.5, 0.7)
SHAPE = (4, 32, 32)
VOXEL = (40.0, 8.0, 8.0)
CONFIG = {
    "datasets": {
        "demo_train": {"raw": {"source": "synthetic://em?shape=32,256,256&seed=2", "key": "raw"},
                       "roles": ["pretrain", "train"]},
        DS: {"raw": {"source": "synthetic://em?shape=16,192,192&seed=3", "key": "raw"},
             "labels": {"source": "synthetic://em?shape=16,192,192&seed=3", "key": "labels"},
             "roles": ["test"], "description": "Held-out labelled volume."},
    },
    "experiments": {"tokenunify": {"pretraining": "tokenunify", "description": "the paper"},
                    "none": {"pretraining": "none", "description": "random init"}},
}


def make_labels() -> np.ndarray:
    """GT: four rectangular bodies 1-4 separated by a background (0) row, (z, y, x) uint64."""
    gt = np.zeros(SHAPE, np.uint64)
    gt[:, 0:15, 0:16], gt[:, 0:15, 16:] = 1, 2
    gt[:, 17:, 0:20], gt[:, 17:, 20:] = 3, 4
    return gt


def make_segmentation(gt: np.ndarray, exp: str, t: float) -> np.ndarray:
    """Segment ids 10 x GT id (99 on background), then split (low t) or merge (high t);
    `none` errs more."""
    seg = gt * 10
    seg[gt == 0] = 99
    if t < 0.4 or exp == "none":  # split body 1 (rows 0-5 become segment 11)
        seg[:, 0:6, 0:16] = 11
    if t < 0.4:  # split body 3 too
        seg[:, 17:, 0:6] = 31
    if t > 0.6 or (exp == "none" and t > 0.4):  # merge bodies 3 and 4
        seg[(gt == 3) | (gt == 4)] = 30
    if exp == "none":  # a corner of body 2 joins segment 10 (body 1)
        seg[:, 0:3, 16:20] = 10
    return seg


def write_tree(root, exp_metrics: bool = True):
    """Fake results/ tree under ``root``; returns the results path."""
    results = root / "results"
    gt = make_labels()
    raw = np.where(gt == 0, 30, 180).astype(np.uint8)
    data = zarr.open_group(str(results / "data" / f"{DS}.zarr"), mode="w")
    for name, arr in (("raw", raw), ("labels", gt)):
        create_volume(data, name, SHAPE, SHAPE, arr.dtype, VOXEL, (0, 0, 0))[...] = arr
    for i, exp in enumerate(EXPERIMENTS):
        d = results / exp / DS
        d.mkdir(parents=True)
        aff = np.stack([np.roll(gt, 1, axis=a) == gt for a in range(3)]) & (gt != 0)
        dtype, scale = ("uint8", 255.0) if i == 0 else ("float16", 1.0)
        ag = zarr.open_group(str(d / "affinities.zarr"), mode="w")
        a = create_volume(ag, "affinities", SHAPE, SHAPE, dtype, VOXEL, (0, 0, 0), channels=3,
                          attrs={"scale": scale, "channel_order": ["z", "y", "x"]})
        a[...] = (aff * scale).astype(dtype)
        sg = zarr.open_group(str(d / "segmentation.zarr"), mode="w")
        sg.attrs["thresholds"] = list(THRESHOLDS)
        rows = []
        for t in THRESHOLDS:
            seg = make_segmentation(gt, exp, t)
            sg.create_array(f"threshold_{t:.3f}", shape=SHAPE, dtype="uint64", chunks=SHAPE)
            sg[f"threshold_{t:.3f}"][...] = seg
            s = evaluate(gt, seg)
            rows.append({"experiment": exp, "dataset": DS, "threshold": t,
                         "voi_split": s.voi_split, "voi_merge": s.voi_merge, "voi": s.voi,
                         "arand": s.arand, "n_segments": len(np.unique(seg[seg != 0])),
                         "gt_min_size": 0, "gt_border_width": 0})
        frag = sg.create_array("fragments", shape=SHAPE, dtype="uint64", chunks=SHAPE)
        frag[...] = make_segmentation(gt, exp, 0.3)
        if exp_metrics:
            pd.DataFrame(rows).to_csv(d / "metrics.csv", index=False)
        for stage in ("pretrain", "finetune"):
            m = results / "models" / exp / stage
            m.mkdir(parents=True)
            lines = []
            if stage == "finetune":
                lines = [{"step": s, "loss": 1.0 / (s + 1 + i),
                          **({"val_voi": 2.0 - s / 20} if s % 5 == 0 else {})} for s in range(20)]
            elif exp != "none":  # `none` has an empty pretraining log
                lines = [{"step": s, "loss": 2.0 / (s + 1), "loss_random": 1.0 / (s + 1),
                          "loss_next": 0.5 / (s + 1), "lr": 1e-4} for s in range(20)]
            (m / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, sec, rss in (("infer/tokenunify/demo_test.tsv", 12.5, 800.0),
                          ("infer/none/demo_test.tsv", 11.0, 900.0),
                          ("pretrain/tokenunify.tsv", 60.0, 1500.0)):
        p = results / "benchmarks" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(header + f"{sec}\t0:00:{int(sec):02d}\t{rss}\t2000\t700\t750\t1.0\t2.0\t95.0"
                     f"\t{sec}\n")
    return results


@pytest.fixture
def results(tmp_path):
    return write_tree(tmp_path)


def inputs(results, datasets=(DS,)) -> ReportInputs:
    """The report's inputs in the fake tree, declared as the workflow declares them."""
    return ReportInputs(
        metrics={e: {d: str(results / e / d / "metrics.csv") for d in datasets}
                 for e in EXPERIMENTS},
        segmentation={e: {DS: str(results / e / DS / "segmentation.zarr")} for e in EXPERIMENTS},
        affinities={e: {DS: str(results / e / DS / "affinities.zarr")} for e in EXPERIMENTS},
        data={DS: str(results / "data" / f"{DS}.zarr")},
        training={e: {s: str(results / "models" / e / s) for s in ("pretrain", "finetune")}
                  for e in EXPERIMENTS},
        benchmarks=str(results / "benchmarks"))


def run(results, tmp_path, **kw):
    out = tmp_path / "report" / "report.html"
    given = inputs(results, (DS, *kw.get("validate_datasets", ())))
    assert build_report(given, out, EXPERIMENTS, [DS], CONFIG, **kw) == out
    return out, out.read_text(encoding="utf-8")


def test_page_contents(results, tmp_path):
    out, html = run(results, tmp_path)
    for name in [*EXPERIMENTS, DS, "demo_train"]:
        assert name in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # 1 VOI curve + 2 loss curves + 2 section views + 1 run-time chart
    assert html.count('<img src="data:image/png;base64,') == 6
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "synthetic://em?shape=16,192,192&amp;seed=3" in html  # the sources, escaped
    assert "40 × 8 × 8" in html  # voxel size read from data/demo_test.zarr
    assert ("Largest split: GT body 1 (960 voxels) is cut into 2 segments: its largest piece, "
            "segment 10, holds 576 voxels and 384 voxels lie in other segments (11).") in html
    assert ("Largest merge: segment 10 (624 labelled voxels) covers 2 GT bodies: 576 voxels of "
            "its main body 1 and 48 voxels of other bodies (2).") in html
    assert "No split: every GT body" in html and "No merge: every segment" in html  # tokenunify
    assert "pretraining: tokenunify" in html  # the config as YAML
    assert "infer" in html and "pretrain" in html  # run-time table rules
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_best_threshold_table_matches_csv(results, tmp_path):
    metrics = read_metrics(inputs(results), EXPERIMENTS, [DS])
    table = score_table(metrics, DS, EXPERIMENTS, 0.5)
    _, html = run(results, tmp_path)
    for exp in EXPERIMENTS:
        csv = pd.read_csv(results / exp / DS / "metrics.csv")
        best = csv.loc[csv["voi"].idxmin()]
        assert table.loc[exp, ("best", "VOI")] == best["voi"]
        assert table.loc[exp, ("best", "threshold")] == best["threshold"]
        assert table.loc[exp, ("best", "VOI_S")] == best["voi_split"]
        fixed = csv[csv["threshold"] == 0.5].iloc[0]
        assert table.loc[exp, ("fixed", "VOI")] == fixed["voi"]
        assert f"{best['voi']:.3f}" in html
    # the lower best VOI of the two experiments is bold
    low = min(table[("best", "VOI")])
    assert f'<td class="num best">{low:.3f}</td>' in html


def test_fixed_threshold_takes_nearest(results):
    metrics = read_metrics(inputs(results), EXPERIMENTS, [DS])
    table = score_table(metrics, DS, EXPERIMENTS, 0.62)
    assert list(table[("fixed", "threshold")]) == [0.7, 0.7]


def test_missing_metrics_names_path(tmp_path):
    results = write_tree(tmp_path, exp_metrics=False)
    with pytest.raises(ValueError, match=re.escape(str(results / "tokenunify" / DS
                                                       / "metrics.csv"))):
        build_report(inputs(results), tmp_path / "r.html", EXPERIMENTS, [DS], CONFIG)
    assert not (tmp_path / "r.html").exists()


def test_missing_column_names_file(results, tmp_path):
    path = results / "none" / DS / "metrics.csv"
    pd.read_csv(path).drop(columns=["voi_merge"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"metrics\.csv lacks required column\(s\) voi_merge"):
        build_report(inputs(results), tmp_path / "r.html", EXPERIMENTS, [DS], CONFIG)


def test_missing_optional_inputs_give_notes(results, tmp_path):
    (results / "models" / "none" / "finetune" / "metrics.jsonl").unlink()
    shutil.rmtree(results / "models" / "tokenunify" / "pretrain")
    shutil.rmtree(results / "none" / DS / "affinities.zarr")
    shutil.rmtree(results / "benchmarks")
    _, html = run(results, tmp_path)
    assert '<p class="note">none: no finetune log' in html
    assert "tokenunify: no pretrain log" in html
    assert "none: the pretrain log is empty (no pretraining)." in html
    assert "No pretrain loss curve to draw." in html
    assert "none: affinities missing" in html
    assert "No benchmark files found" in html
    assert html.count('<img src="data:image/png;base64,') == 4  # VOI, finetune, 2 sections


def test_largest_errors_ids_and_counts():
    gt = make_labels()
    seg = make_segmentation(gt, "none", 0.5)  # body 1 split (rows 0-5), bodies 3 + 4 merged
    split, merge = largest_errors(contingency(gt, seg))
    assert split.body == 1 and split.main_segment == 10 and split.others == (11,)
    assert split.excess == 4 * 6 * 16 and split.size == 4 * 15 * 16
    assert merge.segment == 30 and merge.main_body == 3 and merge.others == (4,)
    assert merge.excess == 4 * 15 * 12 and merge.size == 4 * 15 * 32
    assert largest_errors(contingency(gt, gt)) == (None, None)


def test_segmentation_names_from_attrs(results, tmp_path):
    """Arrays not named threshold_{t:.3f} are found through the group attrs thresholds/arrays."""
    gt = make_labels()
    sg = zarr.open_group(str(results / "tokenunify" / DS / "segmentation.zarr"), mode="w")
    sg.attrs.update({"thresholds": [0.45], "arrays": ["seg_045"]})
    sg.create_array("seg_045", shape=SHAPE, dtype="uint64", chunks=SHAPE)
    sg["seg_045"][...] = make_segmentation(gt, "tokenunify", 0.5)
    _, html = run(results, tmp_path)
    assert "tokenunify: no array threshold_0.500; showing seg_045 (threshold 0.45)." in html


def test_threshold_chosen_on_validation_is_the_headline(results, tmp_path):
    """Selection discipline: each experiment's threshold comes from the validate datasets'
    metrics (minimum mean VOI); the test rows at that threshold head the table, whatever the
    test data's own best threshold is."""
    from tokenunify.report.tables import validated_thresholds

    test = pd.read_csv(results / "tokenunify" / DS / "metrics.csv")
    assert test.loc[test["voi"].idxmin(), "threshold"] == 0.5  # the oracle picks 0.5
    vals = {"val_a": {0.3: 1.0, 0.5: 2.0, 0.7: 0.9}, "val_b": {0.3: 1.0, 0.5: 0.1, 0.7: 1.2}}
    for name, voi in vals.items():  # mean VOI: 0.3 -> 1.0, 0.5 -> 1.05, 0.7 -> 1.05
        for exp in EXPERIMENTS:
            d = results / exp / name
            d.mkdir(parents=True)
            pd.DataFrame([{"experiment": exp, "dataset": name, "threshold": t, "voi_split": v,
                           "voi_merge": 0.0, "voi": v, "arand": 0.1, "n_segments": 3,
                           "gt_min_size": 0, "gt_border_width": 0} for t, v in voi.items()]
                         ).to_csv(d / "metrics.csv", index=False)
    val = read_metrics(inputs(results, list(vals)), EXPERIMENTS, list(vals))
    chosen = validated_thresholds(val)
    assert chosen == {"tokenunify": 0.3, "none": 0.3}
    table = score_table(read_metrics(inputs(results), EXPERIMENTS, [DS]), DS, EXPERIMENTS, 0.5,
                        chosen)
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == ["validated", "fixed", "best"]
    for exp in EXPERIMENTS:
        csv = pd.read_csv(results / exp / DS / "metrics.csv").set_index("threshold")
        assert table.loc[exp, ("validated", "threshold")] == 0.3
        assert table.loc[exp, ("validated", "VOI")] == csv.loc[0.3, "voi"]
        assert table.loc[exp, ("validated", "ARAND")] == csv.loc[0.3, "arand"]
    _, html = run(results, tmp_path, validate_datasets=list(vals))
    assert "Thresholds chosen on the validate datasets (val_a, val_b" in html
    assert "tokenunify 0.3, none 0.3" in html
    assert (html.index("at the threshold chosen on the validate datasets")
            < html.index("at the best threshold on this test set (oracle"))
    # without validate datasets the report says that nothing was chosen on held-out data
    _, html = run(results, tmp_path)
    assert "No validate dataset was scored" in html


def test_curriculum_weights_and_task_losses_are_drawn(results, tmp_path):
    """The pretraining log's per-task losses and curriculum weights (w_<task>) get a figure."""
    lines = [{"step": s, "loss": 1.0 / (s + 1), "loss_random": 1.0 / (s + 1),
              "loss_next": 0.5 / (s + 1), "loss_next_all": 0.7 / (s + 1),
              "w_random": 0.73 if s < 6 else 0.09, "w_next": 0.18 if s < 6 else 0.18,
              "w_next_all": 0.09 if s < 6 else 0.73} for s in range(20)]
    log = results / "models" / "tokenunify" / "pretrain" / "metrics.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    _, html = run(results, tmp_path)
    assert "tokenunify: pretraining loss of each task (left, log scale) and the curriculum" in html
    assert "none: pretraining loss of each task" not in html  # no tasks, no figure


def test_nerl_column_and_curve_when_skeletons_were_scored(results, tmp_path):
    """metrics.csv written by the evaluate stage with skeletons: the score table gains a NERL
    column (highest bold) and the page a NERL-vs-threshold figure; files without the ERL
    columns (the fixture's) still read, with empty NERL."""
    from tokenunify.evaluate import run as evaluate
    from tokenunify.skeletons import SkeletonConfig, skeletonize_volume

    data = results / "data" / f"{DS}.zarr"
    skeletonize_volume(data, tmp_path / "s.npz", SkeletonConfig(dust_threshold=10))
    old = read_metrics(inputs(results), EXPERIMENTS, [DS])
    assert old["nerl"].isna().all()
    assert "NERL" not in score_table(old, DS, EXPERIMENTS, 0.5).columns.get_level_values(1)
    for exp in EXPERIMENTS:
        d = results / exp / DS
        sg = zarr.open_group(str(d / "segmentation.zarr"), mode="a")
        sg.attrs["arrays"] = [f"threshold_{t:.3f}" for t in sg.attrs["thresholds"]]
        evaluate(d / "segmentation.zarr", data, d / "metrics.csv", exp, DS,
                 skeletons=tmp_path / "s.npz")
    table = score_table(read_metrics(inputs(results), EXPERIMENTS, [DS]), DS, EXPERIMENTS, 0.5)
    assert table[("best", "NERL")].notna().all()
    _, html = run(results, tmp_path)
    assert "NERL curve" in html and "merge rule: segment" in html
    high = max(table[("fixed", "NERL")])
    assert f'<td class="num best">{high:.3f}</td>' in html


def test_neuroglancer_section_links_the_exports(results, tmp_path):
    """With exports declared, the report links each folder's layers.json (relative to the page)
    and prints the command that opens a dataset's exports; the threshold is the one of the
    section views (minimum VOI without validate datasets)."""
    import dataclasses

    from tokenunify.export import ExportConfig
    from tokenunify.export import run as export
    from tokenunify.report.tables import chosen_threshold

    metrics = read_metrics(inputs(results), EXPERIMENTS, [DS])
    folders = {}
    for exp in EXPERIMENTS:
        d = results / exp / DS
        sg = zarr.open_group(str(d / "segmentation.zarr"), mode="a")
        sg.attrs["arrays"] = [f"threshold_{t:.3f}" for t in sg.attrs["thresholds"]]
        folders[exp] = d / "neuroglancer"
        export(results / "data" / f"{DS}.zarr", d / "segmentation.zarr", d / "affinities.zarr",
               folders[exp], chosen_threshold(metrics, exp, DS, {}), ExportConfig(meshes=False))
    given = dataclasses.replace(inputs(results), neuroglancer={
        e: {DS: str(f)} for e, f in folders.items()})
    out = tmp_path / "report" / "report.html"
    build_report(given, out, EXPERIMENTS, [DS], CONFIG)
    html = out.read_text()
    assert 'id="neuroglancer"' in html
    assert "tokenunify view " + " ".join(str(folders[e]) for e in EXPERIMENTS) in html
    for exp in EXPERIMENTS:
        href = re.search(rf'href="([^"]*{exp}/{DS}/neuroglancer/layers.json)"', html).group(1)
        assert (out.parent / href).resolve() == (folders[exp] / "layers.json").resolve()
