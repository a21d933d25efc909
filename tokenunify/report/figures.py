"""Figures of the report, each returned as a ``data:image/png;base64,...`` URI.

Figures are drawn on the Agg canvas directly (:class:`matplotlib.figure.Figure`, no pyplot), so
building a report changes no global matplotlib state and is safe in any process.
"""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tokenunify.report.sections import SectionData

log = logging.getLogger(__name__)

DPI = 100
# Error panel colours (RGB in [0, 1]).
SPLIT_MAIN = (0.25, 0.55, 1.0)  # largest piece of the split GT body
SPLIT_OTHER = (1.0, 0.35, 0.05)  # the other pieces
MERGE_MAIN = (0.2, 0.8, 0.25)  # main GT body of the merged segment
MERGE_OTHER = (1.0, 0.15, 0.9)  # other GT bodies inside the merged segment


def new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    """A figure of ``width`` x ``height`` inches on an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def to_data_uri(fig: Figure) -> str:
    """Render ``fig`` as PNG and return it as a base64 data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def label_colors(labels: np.ndarray) -> np.ndarray:
    """Pseudo-random RGB colour per id, 0 black; the same id always gets the same colour.

    Args:
        labels: integer ids, any shape.

    Returns:
        float32 array ``labels.shape + (3,)`` in [0.15, 1] (0 where the id is 0).
    """
    ids, inv = np.unique(labels, return_inverse=True)
    h = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(255) for s in (0, 8, 16)], axis=-1)
    colors = 0.15 + 0.85 * rgb.astype(np.float32) / 255.0
    colors[ids == 0] = 0.0
    return colors[inv.reshape(labels.shape)]


def voi_curve(metrics: pd.DataFrame, experiments: list[str], colors: dict[str, str],
              title: str) -> str:
    """VOI split (x, bits) vs VOI merge (y, bits) over thresholds, one line per experiment.

    Each point is annotated with its threshold; a star marks each experiment's minimum VOI;
    dotted grey lines are iso-VOI (split + merge = const).
    """
    fig = new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    for exp in experiments:
        g = metrics[metrics["experiment"] == exp].sort_values("threshold")
        if g.empty:
            continue
        c = colors[exp]
        ax.plot(g["voi_split"], g["voi_merge"], "o-", color=c, label=exp, ms=4, lw=1.5)
        pts = g.groupby([g["voi_split"].round(4), g["voi_merge"].round(4)], sort=False)
        for (x, y), same in pts:  # coincident points share one label, e.g. "0.5, 0.7"
            ax.annotate(", ".join(f"{t:g}" for t in same["threshold"]), (x, y), fontsize=8,
                        color=c, xytext=(5, 4), textcoords="offset points")
        if g["voi"].notna().any():
            b = g.loc[g["voi"].idxmin()]
            ax.plot([b["voi_split"]], [b["voi_merge"]], "*", color=c, ms=13, mec="black",
                    mew=0.6, zorder=5)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    x1, y1 = ax.get_xlim()[1], ax.get_ylim()[1]
    for v in np.linspace(0, x1 + y1, 7)[1:]:
        ax.plot([0, v], [v, 0], ":", color="0.75", lw=0.8, zorder=0)
    ax.set_xlim(-0.03 * x1, 1.1 * x1)
    ax.set_ylim(-0.03 * y1, 1.1 * y1)
    ax.set_xlabel("VOI split (bits)  → more over-segmentation")
    ax.set_ylabel("VOI merge (bits)  → more under-segmentation")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, title="experiment (★ = min VOI)", title_fontsize=8)
    ax.grid(alpha=0.25)
    return to_data_uri(fig)


def nerl_curve(metrics: pd.DataFrame, experiments: list[str], colors: dict[str, str],
               title: str) -> str | None:
    """NERL (y, 0-1, higher is better) against the agglomeration threshold (x), one line per
    experiment; a star marks each experiment's maximum. None when no row has a NERL."""
    if "nerl" not in metrics or metrics["nerl"].isna().all():
        return None
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    for exp in experiments:
        g = metrics[(metrics["experiment"] == exp) & metrics["nerl"].notna()]
        if g.empty:
            continue
        g = g.sort_values("threshold")
        ax.plot(g["threshold"], g["nerl"], "o-", color=colors[exp], label=exp, ms=4, lw=1.5)
        b = g.loc[g["nerl"].idxmax()]
        ax.plot([b["threshold"]], [b["nerl"]], "*", color=colors[exp], ms=13, mec="black",
                mew=0.6, zorder=5)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("agglomeration threshold")
    ax.set_ylabel("NERL (ERL / ground truth's ERL)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, title="experiment (★ = max NERL)", title_fontsize=8)
    ax.grid(alpha=0.25)
    return to_data_uri(fig)


def loss_curves(logs: dict[str, pd.DataFrame], colors: dict[str, str], stage: str) -> str | None:
    """Training loss (log y) over steps, one line per experiment; a second panel with the
    validation VOI (bits) when any log has ``val_voi``. None when there is no log to draw."""
    if not logs:
        return None
    has_val = any("val_voi" in df.columns and df["val_voi"].notna().any() for df in logs.values())
    fig = new_figure(11 if has_val else 6.4, 4.0)
    axes = fig.subplots(1, 2 if has_val else 1, squeeze=False)[0]
    ax = axes[0]
    for exp, df in logs.items():
        d = df[pd.to_numeric(df["loss"], errors="coerce") > 0]
        ax.plot(d["step"], d["loss"], color=colors[exp], label=exp, lw=1.3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (" (MSE, normalised pixels)" if stage == "pretrain" else ""))
    ax.set_title(f"{stage}: training loss", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.25, which="both")
    if has_val:
        ax = axes[1]
        for exp, df in logs.items():
            if "val_voi" not in df.columns:
                continue
            d = df.dropna(subset=["val_voi"])
            ax.plot(d["step"], d["val_voi"], "o-", color=colors[exp], label=exp, ms=3, lw=1.3)
        ax.set_xlabel("step")
        ax.set_ylabel("validation VOI (bits)")
        ax.set_title(f"{stage}: validation VOI (lower is better)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.25)
    fig.tight_layout()
    return to_data_uri(fig)


def curriculum(log: pd.DataFrame, title: str) -> str | None:
    """Per-task pretraining losses (log y) and the curriculum weights over steps, side by side,
    from one run's ``metrics.jsonl`` (``loss_<task>``, ``w_<task>``). None without tasks."""
    tasks = [c.removeprefix("w_") for c in log.columns if c.startswith("w_")]
    if not tasks:
        return None
    fig = new_figure(11, 3.6)
    left, right = fig.subplots(1, 2)
    for i, task in enumerate(tasks):
        color = f"C{i}"
        if f"loss_{task}" in log:
            d = log[pd.to_numeric(log[f"loss_{task}"], errors="coerce") > 0]
            left.plot(d["step"], d[f"loss_{task}"], color=color, label=task, lw=1.2)
        right.plot(log["step"], log[f"w_{task}"], color=color, label=task, lw=1.5)
    left.set_yscale("log")
    left.set_title(f"{title}: loss per task", fontsize=10)
    left.set_ylabel("MSE (normalised pixels)")
    right.set_title(f"{title}: curriculum weights", fontsize=10)
    right.set_ylabel("weight in the total loss")
    right.set_ylim(0, 1)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.25, which="both")
    fig.tight_layout()
    return to_data_uri(fig)


def runtime_bars(table: pd.DataFrame) -> str | None:
    """Horizontal bars of total wall time (s) per rule, labelled with the number of jobs."""
    if table.empty:
        return None
    t = table.iloc[::-1]
    fig = new_figure(6.4, 0.8 + 0.35 * len(t))
    ax = fig.add_subplot()
    bars = ax.barh(t["rule"], t["total s"], color="C0")
    for b, jobs in zip(bars, t["jobs"], strict=True):
        ax.annotate(f" {jobs} job{'s' if jobs != 1 else ''}", (b.get_width(), b.get_y()
                    + b.get_height() / 2), va="center", fontsize=8)
    ax.set_xlabel("total wall time (s, sum over jobs)")
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.25)
    fig.tight_layout()
    return to_data_uri(fig)


def _grey(img: np.ndarray) -> np.ndarray:
    return np.repeat(img.astype(np.float32)[..., None], 3, axis=-1)


def error_overlay(sec: SectionData, kind: str) -> np.ndarray:
    """RGB (y, x, 3) image: raw (dimmed) with the largest ``kind`` ("split" / "merge") painted.

    Split: the GT body's largest piece blue, its other pieces orange. Merge: the segment's voxels
    on its main GT body green, on other GT bodies magenta.
    """
    shape = next(a.shape for a in (sec.gt, sec.seg, sec.raw) if a is not None)
    out = (0.55 * _grey(sec.raw / 255.0) if sec.raw is not None
           else np.zeros(shape + (3,), np.float32))

    def paint(mask: np.ndarray, color) -> None:
        out[mask] = 0.3 * out[mask] + 0.7 * np.asarray(color, np.float32)

    if kind == "split" and sec.split is not None:
        body = sec.gt == sec.split.body
        paint(body & (sec.seg == sec.split.main_segment), SPLIT_MAIN)
        paint(body & (sec.seg != sec.split.main_segment), SPLIT_OTHER)
    if kind == "merge" and sec.merge is not None:
        seg = (sec.seg == sec.merge.segment) & (sec.gt != 0)
        paint(seg & (sec.gt == sec.merge.main_body), MERGE_MAIN)
        paint(seg & (sec.gt != sec.merge.main_body), MERGE_OTHER)
    return out


def _error_title(sec: SectionData, kind: str) -> str:
    if kind == "split":
        e = sec.split
        return "largest split: none" if e is None else f"largest split: GT body {e.body}"
    e = sec.merge
    return "largest merge: none" if e is None else f"largest merge: segment {e.segment}"


def section_views(sec: SectionData, title: str, threshold: float) -> str:
    """Six panels of the middle z-section (2 x 3): raw, affinities, segmentation; ground
    truth, largest split, largest merge."""
    fig = new_figure(12, 8.6, layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    errors = sec.gt is not None and sec.seg is not None
    panels = [
        (f"raw (z = {sec.z})", None if sec.raw is None else _grey(sec.raw / 255.0)),
        ("affinities (mean of y, x)", None if sec.affinity is None else _grey(sec.affinity)),
        (f"segmentation (t = {threshold:.3f})", None if sec.seg is None
         else label_colors(sec.seg)),
        ("ground truth", None if sec.gt is None else label_colors(sec.gt)),
        (_error_title(sec, "split"), error_overlay(sec, "split") if errors else None),
        (_error_title(sec, "merge"), error_overlay(sec, "merge") if errors else None),
    ]
    for ax, (name, img) in zip(axes, panels, strict=True):
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if img is None:
            ax.set_facecolor("0.93")
            ax.text(0.5, 0.5, "not available", ha="center", va="center", fontsize=10,
                    color="0.4", transform=ax.transAxes)
        else:
            ax.imshow(np.clip(img, 0, 1), interpolation="nearest", aspect=sec.aspect)
    if errors:
        for ax, handles in (
                (axes[4], [Patch(color=SPLIT_MAIN, label="largest piece"),
                           Patch(color=SPLIT_OTHER, label="other pieces")]),
                (axes[5], [Patch(color=MERGE_MAIN, label="main GT body"),
                           Patch(color=MERGE_OTHER, label="other GT bodies")])):
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01),
                      fontsize=9, ncol=2, frameon=False)
    fig.suptitle(title, fontsize=12)
    return to_data_uri(fig)
