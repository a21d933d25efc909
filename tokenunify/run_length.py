"""Expected run length (ERL) and its normalised form (NERL) of a segmentation along
ground-truth skeletons.

ERL is how FFN, LSD and the H01 / MICrONS papers compare segmentations: pick a point on a
ground-truth skeleton at random (uniformly by length), and measure how far one can travel
along that skeleton without leaving the segment that holds the point. A merge error counts by
how much wiring it corrupts, a split by where it cuts. Definitions (those of funlib.evaluate's
``expected_run_length``, which the LSD paper and the AxonEM / NISB evaluations use), with
``seg(n)`` the segment under node ``n``:

- a *merging segment* is a non-zero segment that holds nodes of two or more skeletons; every
  skeleton with a node in one is *merged*, and under this standard rule the whole skeleton
  scores run length 0;
- on the other skeletons an edge (n, m) is *omitted* when ``seg(n)`` or ``seg(m)`` is 0, a
  *split* when they differ, and *correct* otherwise;
- the run of segment s on skeleton k is the total length of k's correct edges in s;
  ``ERL = sum over (k, s) of run^2 / L`` with ``L`` the total length of all skeletons (nm). It
  is the length-weighted mean over skeletons of sum_s run^2 / L_k;
- ``max ERL = sum_k L_k^2 / L`` is the ERL of the ground truth itself (every skeleton one
  run), and ``NERL = ERL / max ERL`` in [0, 1], as NISB and PyTorch Connectomics v2 report it.

One difference from funlib: there, segment 0 also counts as a merging segment when nodes of two
skeletons fall in it (and so zeroes both skeletons); here a node in segment 0 only omits its
edges, since background is no merge. The two agree whenever no node lies in segment 0 (checked
in the tests against funlib's code on such cases).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from tokenunify.skeletons import Skeletons


@dataclass(frozen=True)
class RunLength:
    """ERL figures of one segmentation (lengths in nm, counts of edges / segments / bodies)."""

    erl_nm: float
    max_erl_nm: float
    nerl: float
    split_edges: int  # skeleton edges whose nodes lie in two different non-zero segments
    merging_segments: int  # segments that hold nodes of more than one skeleton
    merged_skeletons: int  # skeletons scored 0 because a node lies in a merging segment
    omitted_edges: int  # edges (of unmerged skeletons) with a node in segment 0
    n_skeletons: int
    total_nm: float

    def as_dict(self) -> dict:
        return asdict(self)


def run_length(skeletons: Skeletons, node_segment: np.ndarray) -> RunLength:
    """ERL / NERL of a segmentation given the segment under every node ((N,) ids, e.g. from
    :meth:`Skeletons.segments_at_nodes`). With no skeleton edge at all every figure is NaN."""
    seg = np.asarray(node_segment).astype(np.uint64).ravel()
    if len(seg) != len(skeletons.nodes):
        raise ValueError(f"run_length: {len(seg)} segment ids for {len(skeletons.nodes)} nodes")
    body = skeletons.skeleton
    ids, lengths = skeletons.lengths()
    total = float(lengths.sum())
    if not len(skeletons.edges) or total <= 0:
        nan = float("nan")
        return RunLength(nan, nan, nan, 0, 0, 0, 0, 0, 0.0)
    max_erl = float(np.sum(lengths ** 2) / total)

    # merging segments: non-zero segments holding nodes of more than one body
    pairs = pd.DataFrame({"body": body, "seg": seg})
    pairs = pairs[pairs["seg"] != 0].drop_duplicates()
    per_seg = pairs.groupby("seg")["body"].nunique()
    merging = per_seg.index[per_seg > 1].to_numpy(np.uint64)
    merged_bodies = np.unique(pairs.loc[pairs["seg"].isin(merging), "body"].to_numpy(np.uint64))

    a, b = skeletons.edges[:, 0], skeletons.edges[:, 1]
    sa, sb = seg[a], seg[b]
    edge_body = body[a]
    live = ~np.isin(edge_body, merged_bodies)
    omitted = live & ((sa == 0) | (sb == 0))
    split = live & ~omitted & (sa != sb)
    correct = live & ~omitted & (sa == sb)

    runs = pd.DataFrame({"body": edge_body[correct], "seg": sa[correct],
                         "nm": skeletons.edge_nm[correct]})
    run = runs.groupby(["body", "seg"], sort=False)["nm"].sum().to_numpy(np.float64)
    erl = float(np.sum(run ** 2) / total)
    return RunLength(erl, max_erl, erl / max_erl, int(split.sum()), len(merging),
                     len(merged_bodies), int(omitted.sum()), len(ids), total)
