"""The evaluate stage: segmentation.zarr + ground truth -> metrics.csv.

One tidy row per threshold: VOI split (over-segmentation, H(seg|gt)), VOI merge
(under-segmentation, H(gt|seg)), VOI = split + merge (bits), ARAND = 1 - Rand F-score, all
from :mod:`tokenunify.metrics` (checked against skimage and waterz.evaluate), and
``n_segments``, the segments that overlap labelled ground truth. Ground-truth label 0 is
ignored, as in TokenUnify's evaluation.

With ground-truth skeletons (:mod:`tokenunify.skeletons`, traced once per dataset by the
skeletonize step), every row also has the expected run length along them (``erl_nm``,
``max_erl_nm``, ``nerl``), the skeleton edges split between two segments
(``skeleton_splits``) and the segments that merge skeletons (``skeleton_merges``), from
:mod:`tokenunify.run_length` (checked against funlib.evaluate), under ``erl_merge_rule``.
Only the segment ids under the skeleton nodes are read.

Optional ground-truth preparation, recorded in every row:

- ``gt_min_size``: ground-truth bodies smaller than this many voxels become 0 (ignored);
- ``gt_border_width``: the official ``seg_widen_border`` per section (boundaries widened by this
  many voxels on each side, set to 0). TokenUnify's MONAI evaluation path widens, its other path
  does not; both are 0 (off) by default.

The contingency table is accumulated block by block, so memory is bounded by the block and the
table; ground-truth preparation reads the labels whole when enabled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from tokenunify.io.zarrio import require_complete
from tokenunify.metrics import COLUMNS, contingency_blockwise, scores
from tokenunify.run_length import run_length
from tokenunify.settings import defaults
from tokenunify.skeletons import SkeletonConfig, Skeletons

log = logging.getLogger(__name__)


_DEFAULTS = defaults("evaluate")


@dataclass
class EvaluateConfig:
    """gt_min_size: voxels (0 = keep all). gt_border_width: voxels (0 = off). block: (z, y, x)
    voxels per contingency block. erl_merge_rule: 'segment' or 'skeleton'
    (:mod:`tokenunify.run_length`). skeletons: the skeleton settings (used by the
    skeletonize step; here only whether ERL is scored)."""

    gt_min_size: int = _DEFAULTS["gt_min_size"]
    gt_border_width: int = _DEFAULTS["gt_border_width"]
    block: tuple = _DEFAULTS["block"]
    erl_merge_rule: str = _DEFAULTS["erl_merge_rule"]
    skeletons: SkeletonConfig = field(default_factory=SkeletonConfig)

    def __post_init__(self):
        self.block = tuple(int(b) for b in self.block)


def prepare_gt(labels, cfg: EvaluateConfig):
    """Ground truth as used for scoring: a zarr array as is, or a filtered numpy copy."""
    if not cfg.gt_min_size and not cfg.gt_border_width:
        return labels
    import fastremap

    from tokenunify.affinities import widen_borders

    gt = np.asarray(labels[:])
    if cfg.gt_border_width:
        gt = widen_borders(gt, cfg.gt_border_width)
    if cfg.gt_min_size:
        ids, counts = fastremap.unique(gt, return_counts=True)
        small = ids[(counts < cfg.gt_min_size) & (ids != 0)]
        if len(small):
            gt = fastremap.mask(gt, small)
        log.info("ground truth: %d bodies under %d voxels ignored", len(small), cfg.gt_min_size)
    return gt


def run(segmentation: str | Path, volume: str | Path, out: str | Path, experiment: str,
        dataset: str, cfg: EvaluateConfig | None = None,
        skeletons: str | Path | None = None) -> pd.DataFrame:
    """Score every threshold of ``segmentation`` against ``volume``'s ``labels`` (and, with
    ``skeletons``, a skeleton ``.npz``, along them); write ``out``.

    Raises ValueError naming the file when the labels are missing, their shape differs from the
    segmentation's, a segmentation is empty (all 0), or the skeletons lie outside the volume.
    """
    cfg = cfg or EvaluateConfig()
    skel = Skeletons.load(skeletons) if skeletons is not None else None
    seg_root = zarr.open_group(str(segmentation), mode="r")
    names = seg_root.attrs.get("arrays")
    thresholds = seg_root.attrs.get("thresholds")
    if not names or not thresholds:
        raise ValueError(f"{segmentation}: no 'arrays'/'thresholds' attributes; not written by "
                         f"the agglomerate stage")
    vol = zarr.open_group(str(volume), mode="r")
    if "labels" not in vol:
        raise ValueError(f"{volume}: no 'labels' array; dataset {dataset!r} needs ground truth "
                         f"to be evaluated (give it labels or drop the 'test' role)")
    labels = vol["labels"]
    rows = []
    for arr in [labels] + [seg_root[n] for n in names if n in seg_root]:  # before computing
        require_complete(arr, "evaluate")
    if skel is not None and len(skel.nodes) and np.any(skel.nodes.max(0) >= labels.shape):
        raise ValueError(f"{skeletons}: nodes reach {tuple(skel.nodes.max(0))}, outside "
                         f"{volume}/labels of shape {tuple(labels.shape)}; skeletonize this "
                         f"dataset again")
    gt = prepare_gt(labels, cfg)
    for name, t in zip(names, thresholds, strict=True):
        if name not in seg_root:
            raise ValueError(f"{segmentation}: threshold array {name!r} (t = {t}) is listed in "
                             f"its attributes but missing; rerun the agglomerate stage")
        seg = seg_root[name]
        if tuple(seg.shape) != tuple(labels.shape):
            raise ValueError(f"{volume}/labels has shape {tuple(labels.shape)} but "
                             f"{segmentation}/{name} has shape {tuple(seg.shape)}")
        table = contingency_blockwise(gt, seg, cfg.block, progress=False)
        n_seg = len(np.unique(table.seg[table.seg != 0]))
        if not table.n:
            prepared = (f" after gt_min_size {cfg.gt_min_size} / gt_border_width "
                        f"{cfg.gt_border_width}" if cfg.gt_min_size or cfg.gt_border_width
                        else "")
            raise ValueError(f"{volume}/labels of dataset {dataset!r} has no labelled voxel "
                             f"(all 0{prepared}): there is nothing to score. Give the test "
                             f"dataset non-zero labels or drop its 'test' role")
        if table.n and not np.any(table.seg != 0):
            raise ValueError(f"{segmentation}/{name} is empty (all 0) where the ground truth "
                             f"has labels")
        s = scores(table)
        row = {"experiment": experiment, "dataset": dataset, "threshold": float(t),
               "voi_split": s.voi_split, "voi_merge": s.voi_merge, "voi": s.voi,
               "arand": s.arand, "n_segments": n_seg, "gt_min_size": cfg.gt_min_size,
               "gt_border_width": cfg.gt_border_width}
        if skel is not None:
            r = run_length(skel, skel.segments_at_nodes(seg), cfg.erl_merge_rule)
            row.update(erl_nm=r.erl_nm, max_erl_nm=r.max_erl_nm, nerl=r.nerl,
                       skeleton_splits=r.split_edges, skeleton_merges=r.merging_segments,
                       erl_merge_rule=cfg.erl_merge_rule)
        rows.append(row)
        log.info("%s %s t=%.3f: VOI split %.4f merge %.4f ARAND %.4f NERL %s", experiment,
                 dataset, t, s.voi_split, s.voi_merge, s.arand,
                 f"{row['nerl']:.4f}" if "nerl" in row else "-")
    df = pd.DataFrame(rows, columns=COLUMNS)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, out)
    return df
