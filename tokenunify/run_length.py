"""Expected run length (ERL) and its normalised form (NERL) of a segmentation along
ground-truth skeletons.

ERL is how FFN, LSD and the H01 / MICrONS papers compare segmentations: pick a point on a
ground-truth skeleton at random (uniformly by length), and measure how far one can travel
along that skeleton without leaving the segment that holds the point. A merge error counts by
how much wiring it corrupts, a split by where it cuts. Definitions (those of funlib.evaluate's
``expected_run_length``, which the LSD paper and the AxonEM / NISB evaluations use), with
``seg(n)`` the segment under node ``n``:

- a *merging segment* is a non-zero segment that holds nodes of two or more skeletons;
- an edge (n, m) is *omitted* when ``seg(n)`` or ``seg(m)`` is 0, a *split* when they differ,
  *merged* as the merge rule says, and *correct* otherwise. Two merge rules are in use:
  ``skeleton`` (FFN's, and funlib's until 2019, commit e2b4d90): every skeleton with a node in
  a merging segment is merged whole, all its edges scoring 0; ``segment`` (funlib since
  b533ea8): only the edges inside a merging segment are merged, the rest of the skeleton still
  runs. ``segment`` is the default: on evaluation crops the strict rule zeroes nearly every
  skeleton (the supervoxels that ship with NeuroProof score NERL 0.005 under it on z 200-249,
  0.036 under ``segment``), so it hardly tells two segmentations apart;
- the run of segment s on skeleton k is the total length of k's correct edges in s;
  ``ERL = sum over (k, s) of run^2 / L`` with ``L`` the total length of all skeletons (nm). It
  is the length-weighted mean over skeletons of sum_s run^2 / L_k;
- ``max ERL = sum_k L_k^2 / L`` is the ERL of the ground truth itself (every skeleton one
  run), and ``NERL = ERL / max ERL`` in [0, 1], as NISB and PyTorch Connectomics v2 report it.

Segment 0 is never a merging segment here: a node in it only omits its edges, since
background is no merge. funlib's ``skeleton`` rule also lets segment 0 merge skeletons whose
nodes fall in it; the two agree whenever no node lies in segment 0, and with the ``segment``
rule they agree always (``benchmarks/check_erl_reference.py`` runs funlib's code beside this
one on NeuroProof).
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
    merged_skeletons: int  # skeletons with a node in a merging segment
    omitted_edges: int  # edges with a node in segment 0 (not counting wholly merged skeletons)
    n_skeletons: int
    total_nm: float

    def as_dict(self) -> dict:
        return asdict(self)


MERGE_RULES = ("skeleton", "segment")


def run_length(skeletons: Skeletons, node_segment: np.ndarray, merge_rule: str = "segment"
               ) -> RunLength:
    """ERL / NERL of a segmentation given the segment under every node ((N,) ids, e.g. from
    :meth:`Skeletons.segments_at_nodes`); ``merge_rule``: 'skeleton' or 'segment' (module
    docstring). With no skeleton edge at all every figure is NaN."""
    if merge_rule not in MERGE_RULES:
        raise ValueError(f"merge_rule must be one of {MERGE_RULES}, not {merge_rule!r}")
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
    if merge_rule == "skeleton":  # a merged skeleton scores 0 whole
        live = ~np.isin(edge_body, merged_bodies)
    else:  # only the edges inside a merging segment score 0
        live = np.ones(len(a), bool)
    omitted = live & ((sa == 0) | (sb == 0))
    split = live & ~omitted & (sa != sb)
    correct = live & ~omitted & (sa == sb) & ~np.isin(sa, merging)

    runs = pd.DataFrame({"body": edge_body[correct], "seg": sa[correct],
                         "nm": skeletons.edge_nm[correct]})
    run = runs.groupby(["body", "seg"], sort=False)["nm"].sum().to_numpy(np.float64)
    erl = float(np.sum(run ** 2) / total)
    return RunLength(erl, max_erl, erl / max_erl, int(split.sum()), len(merging),
                     len(merged_bodies), int(omitted.sum()), len(ids), total)
