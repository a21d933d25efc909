"""The recipe's post-processing choices, measured on validation data only.

For a fine-tuned checkpoint and a downloaded validate volume (raw and labels), this predicts the
affinities once with the recipe's ``infer`` settings and segments them with each candidate
fragment method and merge scoring, each at every threshold (0.3 ... 0.95); it prints, per
candidate, the best VOI (split, merge) and ARAND over the thresholds and the threshold that
gave it, and each VOI's ratio to the recipe's own choice. Nothing here looks at test data:
this is how the recipe's fragments and scoring were chosen.

Candidates: the recipe's ``agglomerate`` section as configured; the seeded watershed in 3-D
(``maxima_distance_3d``) in 3-D tiles with the mean and median merges, without stitching and
stitched at 0.5, and on the whole volume; waterz's 3-D watershed in 3-D tiles (stitched at 0.5)
with the 75 % quantile and the median, and on the whole volume with the median, mean and 75 %
quantile; the official per-section ``maxima_distance`` fragments, blockwise, median; and with
``--tta``, the 8-flip test-time augmentation (about 8x the inference time) with the recipe's.

    .venv/bin/python benchmarks/bench_neuroproof_choices.py \\
        --checkpoint results/models/none/finetune/checkpoint.pt \\
        --volume results/data/neuroproof_validate.zarr [--tta] [--recipe-only]

Settings come from ``--config`` (default ``config/examples/neuroproof.yaml``). Skips (exit 0,
SKIP) when the checkpoint or the volume is absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
import zarr

from tokenunify import metrics
from tokenunify.agglomerate import AgglomerateConfig, threshold_name
from tokenunify.agglomerate import run as agglomerate
from tokenunify.inference import InferConfig
from tokenunify.inference import run as infer
from tokenunify.settings import from_section

REPO = Path(__file__).resolve().parents[1]
MEDIAN = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256>>"
Q75 = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 75, ScoreValue, 256>>"
MEAN = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.3, 0.951, 0.05))


def candidates(recipe: AgglomerateConfig, tta: bool) -> list[tuple[str, bool, AgglomerateConfig]]:
    """(name, with TTA, agglomerate settings) of every candidate; the recipe's own first."""
    tiles_3d = dataclasses.replace(recipe, fragments="maxima_distance_3d", scoring=MEAN,
                                   stitch_threshold=None, hierarchy=None)
    waterz_tiles = dataclasses.replace(recipe, fragments="waterz", scoring=Q75,
                                       stitch_threshold=0.5, hierarchy=None)
    whole = dataclasses.replace(recipe, method="waterz", fragments="waterz", hierarchy=None)
    per_section = dataclasses.replace(recipe, fragments="maxima_distance", scoring=MEDIAN,
                                      stitch_threshold=0.5, hierarchy=None)
    out = [("the recipe's agglomerate section (maxima_distance_3d in 3-D tiles, mean, no "
            "stitching)", False, recipe),
           ("maxima_distance_3d in 3-D tiles, median, no stitching", False,
            dataclasses.replace(tiles_3d, scoring=MEDIAN)),
           ("maxima_distance_3d in 3-D tiles, mean, stitched at 0.5", False,
            dataclasses.replace(tiles_3d, stitch_threshold=0.5)),
           ("maxima_distance_3d whole volume, mean", False,
            dataclasses.replace(whole, fragments="maxima_distance_3d", scoring=MEAN)),
           ("waterz in 3-D tiles, 75 % quantile, stitched at 0.5 (the recipe until aa0847c)",
            False, waterz_tiles),
           ("waterz in 3-D tiles, median, stitched at 0.5", False,
            dataclasses.replace(waterz_tiles, scoring=MEDIAN)),
           ("waterz whole volume, median", False, dataclasses.replace(whole, scoring=MEDIAN)),
           ("waterz whole volume, mean", False, dataclasses.replace(whole, scoring=MEAN)),
           ("waterz whole volume, 75 % quantile", False, dataclasses.replace(whole, scoring=Q75)),
           ("maxima_distance blockwise, median", False, per_section)]
    if tta:
        out.append(("test-time augmentation (8 flips), the recipe's", True, recipe))
    return out


def best(seg_path: Path, labels: np.ndarray, thresholds) -> tuple[float, metrics.Scores]:
    """(threshold, scores) of the lowest VOI over ``thresholds`` (label 0 ignored)."""
    root = zarr.open_group(str(seg_path), mode="r")
    found = [(t, metrics.evaluate(labels, root[threshold_name(t)][:])) for t in thresholds]
    return min(found, key=lambda ts: ts[1].voi)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="fine-tuned checkpoint.pt")
    ap.add_argument("--volume", type=Path, required=True,
                    help="downloaded validate volume (.zarr with raw and labels)")
    ap.add_argument("--config", type=Path, default=REPO / "config/examples/neuroproof.yaml")
    ap.add_argument("--tta", action="store_true", help="also the 8-flip TTA candidate")
    ap.add_argument("--recipe-only", action="store_true",
                    help="only the recipe's agglomerate section (and with --tta, its TTA row)")
    args = ap.parse_args()
    for p in (args.checkpoint, args.volume):
        if not p.exists():
            print(f"SKIP: {p} is absent (run the recipe first: README, Results on real data)")
            return 0
    cfg = yaml.safe_load(args.config.read_text())
    infer_cfg = from_section(InferConfig, cfg.get("infer"), "infer")
    recipe = from_section(AgglomerateConfig, {**cfg.get("agglomerate", {}),
                                              "thresholds": list(THRESHOLDS)}, "agglomerate")
    labels = zarr.open_group(str(args.volume), mode="r")["labels"][:]
    tmp = Path(tempfile.mkdtemp(prefix="bench_choices_"))
    affinities, seconds = {}, {}
    rows = []
    todo = candidates(recipe, args.tta)
    if args.recipe_only:
        todo = [c for c in todo if c[2] is recipe]
    for name, tta, agg in todo:
        if tta not in affinities:
            t0 = time.perf_counter()
            affinities[tta] = infer(args.volume, args.checkpoint, tmp / f"aff_{int(tta)}.zarr",
                                    dataclasses.replace(infer_cfg, tta=tta))
            seconds[tta] = time.perf_counter() - t0
        t0 = time.perf_counter()
        seg = agglomerate(affinities[tta], tmp / f"seg_{len(rows)}.zarr",
                          dataclasses.replace(agg, batch_blocks=None))
        t, s = best(seg, labels, THRESHOLDS)
        rows.append((name, t, s, time.perf_counter() - t0))
        print(f"{name}: VOI {s.voi:.3f} (split {s.voi_split:.3f}, merge {s.voi_merge:.3f}), "
              f"ARAND {s.arand:.3f} at t = {t:g}; {rows[-1][3]:.0f} s", flush=True)
    print(f"\ninference: {seconds[False]:.0f} s"
          + (f", with TTA {seconds[True]:.0f} s ({seconds[True] / seconds[False]:.1f}x)"
             if True in seconds else ""))
    ref = rows[0][2].voi
    print("\n| fragments, merge | VOI | ARAND | at t | VOI / recipe's |")
    print("|---|---|---|---|---|")
    for name, t, s, _ in rows:
        print(f"| {name} | {s.voi:.3f} | {s.arand:.3f} | {t:g} | {s.voi / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
