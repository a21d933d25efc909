"""waterz scoring functions, re-implemented on fragment-graph statistics.

Two of waterz's scoring functions are supported, by their waterz names:

- ``OneMinus<HistogramQuantileAffinity<RegionGraphType, Q, ScoreValue, BINS[, INIT_WITH_MAX]>>``
  (TokenUnify's choice, Q = 50, BINS = 256). waterz's semantics, from its
  ``HistogramQuantileProvider`` and ``discretize.hpp``:

  - an affinity a goes to bin ``0`` if not a > 0, ``BINS-1`` if a >= 1, else
    ``min(int(a * BINS), BINS-1)`` (float32 arithmetic);
  - with INIT_WITH_MAX (waterz's default, and what its name normalisation adds), the initial
    histogram of a fragment pair holds one count, in the bin of the pair's *largest* affinity;
    without it, one count per affinity sample;
  - merging two edges adds their histograms;
  - the quantile is the first bin whose running count reaches ``Q * total // 100 + 1``,
    reported as ``(bin + 0.5) / BINS``; the score is one minus that.

- ``OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>``: one minus (sum / count) of all
  affinity samples between the two regions; merging adds sums and counts.

Per fragment pair the blockwise stage collects what every scorer needs: sample count, sum,
maximum and (only without INIT_WITH_MAX) the sparse histogram, so each affinity sample is
counted exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

DEFAULT = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256>>"

_QUANTILE = re.compile(r"^OneMinus<HistogramQuantileAffinity<RegionGraphType,\s*(\d+),\s*"
                       r"ScoreValue,\s*(\d+)(?:,\s*(true|false))?>>$")
_MEAN = re.compile(r"^OneMinus<MeanAffinity<RegionGraphType,\s*ScoreValue>>$")


def discretize(a: np.ndarray, bins: int) -> np.ndarray:
    """waterz's discretize for float affinities: (...) float -> int64 bins in [0, bins)."""
    a = np.asarray(a, np.float32)
    with np.errstate(invalid="ignore"):
        scaled = np.where(a > 0, a * np.float32(bins), 0).astype(np.int64)
    return np.where(a >= 1, bins - 1, np.minimum(scaled, bins - 1))


@dataclass(frozen=True)
class Scoring:
    """A parsed scoring function. kind: 'quantile' or 'mean'."""

    name: str
    kind: str
    quantile: int = 50
    bins: int = 256
    init_with_max: bool = True

    @property
    def needs_histogram(self) -> bool:
        """Whether per-sample histograms must be collected (quantile without INIT_WITH_MAX)."""
        return self.kind == "quantile" and not self.init_with_max

    def initial_states(self, count, total, vmax, hists: list | None) -> list:
        """Per-edge states from the collected statistics of the fragment pairs (arrays of
        sample counts, sums and maxima, and with ``needs_histogram`` one {bin: n} per edge)."""
        if self.kind == "mean":
            return [[float(s), int(c)] for s, c in zip(total, count, strict=True)]
        if self.init_with_max:
            return [{int(b): 1} for b in discretize(vmax, self.bins)]
        return [dict(h) for h in hists]

    @staticmethod
    def merge(into, other) -> None:
        """Add ``other``'s state into ``into`` (in place)."""
        if isinstance(into, list):
            into[0] += other[0]
            into[1] += other[1]
        else:
            for k, v in other.items():
                into[k] = into.get(k, 0) + v

    def score(self, state) -> float:
        """The edge's score (lower merges first)."""
        if self.kind == "mean":
            return 1.0 - state[0] / state[1]
        total = sum(state.values())
        pivot = self.quantile * total // 100 + 1
        run = 0
        for b in sorted(state):
            run += state[b]
            if run >= pivot:
                return 1.0 - (b + 0.5) / self.bins
        return 1.0 - (self.bins - 0.5) / self.bins  # unreachable for a non-empty histogram


def parse(name: str) -> Scoring:
    """Parse a waterz scoring-function name; ValueError naming it when unsupported."""
    s = " ".join(name.split())
    m = _QUANTILE.match(s)
    if m:
        q, bins = int(m.group(1)), int(m.group(2))
        if not 0 <= q <= 100 or bins < 2:
            raise ValueError(f"agglomerate.scoring {name!r}: quantile must be in 0..100 and "
                             f"bins >= 2")
        return Scoring(s, "quantile", q, bins, m.group(3) != "false")
    if _MEAN.match(s):
        return Scoring(s, "mean")
    raise ValueError(f"agglomerate.scoring {name!r} is not supported; use {DEFAULT!r} or "
                     f"'OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>'")
