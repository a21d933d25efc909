"""Section views: read the middle z-section of a test volume and find the largest split / merge.

The largest errors are found from the contingency table of the whole volume, accumulated block by
block (:func:`tokenunify.metrics.contingency_blockwise`, gt label 0 ignored), so memory stays
bounded by one block plus the table. Only the middle z-section of each volume is read for display.

- **Largest split**: the GT body with the most voxels outside its largest segment piece.
- **Largest merge**: the segment (id != 0; 0 means "no segment") with the most voxels of GT bodies
  other than its main (largest-overlap) body.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from tokenunify.agglomerate.blockwise import threshold_name
from tokenunify.metrics import Contingency, contingency_blockwise
from tokenunify.report.inputs import ReportInputs

log = logging.getLogger(__name__)

BLOCK = (64, 512, 512)  # (z, y, x) voxels read at once for the contingency table


@dataclass(frozen=True)
class Split:
    """A GT body cut into several segments (voxel counts over the whole volume)."""

    body: int  # GT id
    size: int  # voxels of the body (gt != 0)
    n_segments: int  # segments overlapping it
    main_segment: int  # the segment holding most of it
    main_count: int  # voxels in that segment
    others: tuple[int, ...]  # the other segment ids, largest overlap first
    excess: int  # voxels outside the main piece (size - main_count)


@dataclass(frozen=True)
class Merge:
    """A segment covering several GT bodies (voxel counts over the whole volume, gt != 0)."""

    segment: int  # segment id
    size: int  # voxels of the segment inside labelled GT
    n_bodies: int
    main_body: int  # the GT body it mostly covers
    main_count: int
    others: tuple[int, ...]  # the other GT ids, largest overlap first
    excess: int  # voxels of other bodies (size - main_count)


@dataclass
class SectionData:
    """The middle section of one (experiment, dataset), each image (y, x) or None if missing."""

    z: int  # section index (voxels)
    raw: np.ndarray | None = None  # uint8
    affinity: np.ndarray | None = None  # float32 in [0, 1], mean of y and x affinities
    seg: np.ndarray | None = None  # uint64
    gt: np.ndarray | None = None  # uint64, 0 = unlabelled
    aspect: float = 1.0  # y / x voxel size, for display
    split: Split | None = None
    merge: Merge | None = None
    notes: list[str] = field(default_factory=list)


def _worst(df: pd.DataFrame, key: str):
    """Id (in column ``key``) with the most voxels outside its largest overlap.

    ``df`` (gt, seg, n) is sorted by decreasing count. Returns (id, total voxels, its rows
    largest first, excess voxels), or None when no ``key`` id overlaps more than one other id.
    """
    if df.empty:
        return None
    grouped = df.groupby(key, sort=False)["n"]
    size = grouped.sum()
    excess = size - grouped.max()
    if excess.max() <= 0:
        return None
    worst = int(excess.idxmax())
    return worst, int(size[worst]), df[df[key] == worst], int(excess[worst])


def largest_errors(table: Contingency) -> tuple[Split | None, Merge | None]:
    """The largest split and merge of a contingency table; None where there is none."""
    df = pd.DataFrame({"gt": table.gt, "seg": table.seg, "n": table.count})
    df = df.sort_values(["n", "gt", "seg"], ascending=[False, True, True], kind="stable")
    split = merge = None
    found = _worst(df, "gt")
    if found:
        body, size, rows, excess = found
        split = Split(body=body, size=size, n_segments=len(rows),
                      main_segment=int(rows["seg"].iloc[0]), main_count=int(rows["n"].iloc[0]),
                      others=tuple(int(s) for s in rows["seg"].iloc[1:]), excess=excess)
    found = _worst(df[df["seg"] != 0], "seg")  # segment 0 is "no segment", not a merge
    if found:
        seg, size, rows, excess = found
        merge = Merge(segment=seg, size=size, n_bodies=len(rows),
                      main_body=int(rows["gt"].iloc[0]), main_count=int(rows["n"].iloc[0]),
                      others=tuple(int(g) for g in rows["gt"].iloc[1:]), excess=excess)
    return split, merge


def _open(path: Path, what: str, notes: list[str]) -> zarr.Group | None:
    try:
        return zarr.open_group(str(path), mode="r")
    except FileNotFoundError:
        log.warning("missing %s: %s", what, path)
        notes.append(f"{what} missing ({path.name}).")
        return None


def _seg_array(group: zarr.Group, threshold: float, notes: list[str]) -> zarr.Array | None:
    """The array of ``threshold``: ``threshold_{t:.3f}``, else the nearest threshold listed in
    the group attrs ``thresholds`` (with names from attrs ``arrays`` when present)."""
    name = threshold_name(threshold)
    if name in group:
        return group[name]
    ts = [float(t) for t in group.attrs.get("thresholds", [])]
    names = group.attrs.get("arrays") or [threshold_name(t) for t in ts]
    near = [(t, n) for t, n in zip(ts, names, strict=False) if n in group]
    if not near:
        log.warning("no segmentation array %s in %s", name, group.store)
        notes.append(f"no segmentation array {name}.")
        return None
    t, found = min(near, key=lambda tn: abs(tn[0] - threshold))
    notes.append(f"no array {name}; showing {found} (threshold {t:g}).")
    return group[found]


def load_section(inputs: ReportInputs, exp: str, ds: str, threshold: float) -> SectionData:
    """Middle z-section images of ``exp`` on ``ds`` at ``threshold``, and its largest errors.

    Reads the dataset's volume (raw, labels), and the run's affinities and segmentation of it;
    anything missing is left None with a note (and a warning).
    """
    notes: list[str] = []
    data = _open(inputs.path("data", ds), "input volume", notes)
    seg_g = _open(inputs.path("segmentation", exp, ds), "segmentation", notes)
    aff_g = _open(inputs.path("affinities", exp, ds), "affinities", notes)
    raw_a = data["raw"] if data is not None and "raw" in data else None
    gt_a = data["labels"] if data is not None and "labels" in data else None
    seg_a = _seg_array(seg_g, threshold, notes) if seg_g is not None else None
    aff_a = aff_g["affinities"] if aff_g is not None and "affinities" in aff_g else None
    if data is not None and gt_a is None:
        notes.append("no ground-truth labels.")
    shapes = [tuple(a.shape[-3:]) for a in (raw_a, gt_a, seg_a, aff_a) if a is not None]
    if not shapes:
        return SectionData(z=0, notes=notes)
    z = shapes[0][0] // 2
    out = SectionData(z=z, notes=notes)
    ref = raw_a if raw_a is not None else gt_a
    vs = ref.attrs.get("voxel_size") if ref is not None else None
    if vs:
        out.aspect = float(vs[1]) / float(vs[2])
    if raw_a is not None:
        out.raw = np.asarray(raw_a[z])
    if gt_a is not None:
        out.gt = np.asarray(gt_a[z]).astype(np.uint64)
    if seg_a is not None:
        out.seg = np.asarray(seg_a[z]).astype(np.uint64)
    if aff_a is not None:
        scale = float(aff_a.attrs.get("scale", 255.0 if aff_a.dtype == np.uint8 else 1.0))
        yx = np.asarray(aff_a[1:3, z], dtype=np.float32) / scale
        out.affinity = np.clip(yx.mean(axis=0), 0.0, 1.0)
    if gt_a is not None and seg_a is not None:
        if tuple(gt_a.shape) != tuple(seg_a.shape):
            notes.append(f"labels {tuple(gt_a.shape)} and segmentation {tuple(seg_a.shape)} "
                         "differ in shape: no error analysis.")
        else:
            block = tuple(min(b, n) for b, n in zip(BLOCK, gt_a.shape, strict=True))
            out.split, out.merge = largest_errors(
                contingency_blockwise(gt_a, seg_a, block, progress=False))
    return out


def _first_ids(ids, n: int = 5) -> str:
    """The first ``n`` ids, comma-separated, with an ellipsis when there are more."""
    return ", ".join(map(str, ids[:n])) + (" …" if len(ids) > n else "")


def error_caption(sec: SectionData) -> str:
    """Plain-text description of the largest split and merge (ids, voxel counts)."""
    if sec.gt is None or sec.seg is None:
        return "No error analysis (labels or segmentation missing)."
    parts = []
    s, m = sec.split, sec.merge
    if s is None:
        parts.append("No split: every GT body lies in a single segment.")
    else:
        shown = _first_ids(s.others)
        vis = "" if np.any(sec.gt == s.body) else " (not in this section)"
        parts.append(f"Largest split: GT body {s.body} ({s.size} voxels){vis} is cut into "
                     f"{s.n_segments} segments: its largest piece, segment {s.main_segment}, "
                     f"holds {s.main_count} voxels and {s.excess} voxels lie in other segments "
                     f"({shown}).")
    if m is None:
        parts.append("No merge: every segment covers a single GT body.")
    else:
        shown = _first_ids(m.others)
        vis = "" if np.any(sec.seg == m.segment) else " (not in this section)"
        parts.append(f"Largest merge: segment {m.segment} ({m.size} labelled voxels){vis} covers "
                     f"{m.n_bodies} GT bodies: {m.main_count} voxels of its main body "
                     f"{m.main_body} and {m.excess} voxels of other bodies ({shown}).")
    return " ".join(parts)
