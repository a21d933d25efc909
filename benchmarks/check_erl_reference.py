"""ERL of tokenunify.run_length against funlib.evaluate's ``expected_run_length``, side by side.

funlib.evaluate (github.com/funkelab/funlib.evaluate) is the reference implementation of the
ERL that the LSD paper, AxonEM and the PyTorch Connectomics ERL scripts use. It is not on PyPI
and needs graph-tool for its other parts, so it is not a dependency: give a checkout with
``--funlib`` and this script loads its ``funlib/evaluate/run_length.py`` (numpy only) by path,
runs it on a networkx graph of the same skeletons, and prints both ERLs for several
segmentations of the NeuroProof test part (z 200-249): the ground truth itself, the
supervoxels that ship with NeuroProof, and the supervoxels with random pairs of neighbouring
supervoxels merged (which creates merging segments). No node lies in segment 0 in any of
them, the one case where the two definitions differ (see tokenunify/run_length.py).

funlib changed its merge rule in 2019: up to commit e2b4d90 a skeleton touching a merging
segment scored 0 whole (our ``skeleton`` rule); from b533ea8 on only the edges inside the
merging segment do (our ``segment`` rule). Give a checkout of each to check both:

    git clone https://github.com/funkelab/funlib.evaluate /tmp/funlib.evaluate
    git -C /tmp/funlib.evaluate worktree add /tmp/funlib.evaluate-2019 e2b4d90
    python benchmarks/check_erl_reference.py --funlib /tmp/funlib.evaluate \
        --funlib-2019 /tmp/funlib.evaluate-2019
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("TOKENUNIFY_SHARED_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))


def bodies(name: str) -> np.ndarray:
    import fastremap
    import h5py

    from tokenunify.io.remote import gunzip_cached

    with h5py.File(gunzip_cached(DATA / "neuroproof_fib_medulla_250" / name)) as f:
        stack, t = f["stack"][200:250], f["transforms"][:]
    lut = dict(zip(t[:, 0].tolist(), t[:, 1].tolist(), strict=True))
    return fastremap.remap(stack.astype(np.uint64), lut, preserve_missing_labels=True)


def merged_pairs(seg: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``seg`` with ``n`` random pairs of face-adjacent segments merged."""
    import fastremap

    a, b = seg[:, :, 1:].ravel(), seg[:, :, :-1].ravel()
    pairs = np.unique(np.stack([a, b], 1)[a != b], axis=0)
    pick = pairs[np.random.default_rng(seed).choice(len(pairs), n, replace=False)]
    lut = {int(v): int(u) for u, v in pick}
    return fastremap.remap(seg, lut, preserve_missing_labels=True)


def funlib_erl(module, sk, seg_at_nodes: np.ndarray) -> float:
    import networkx as nx

    g = nx.Graph()
    pos = sk.nodes * np.asarray(sk.voxel_size)
    for i, (body, p) in enumerate(zip(sk.skeleton.tolist(), pos, strict=True)):
        g.add_node(i, skeleton_id=body, z=p[0], y=p[1], x=p[2])
    g.add_edges_from(sk.edges.tolist())
    lut = dict(enumerate(seg_at_nodes.tolist()))
    return float(module.expected_run_length(g, "skeleton_id", "length", lut,
                                            skeleton_position_attributes=["z", "y", "x"]))


def load_reference(checkout: Path, name: str):
    src = checkout / "funlib" / "evaluate" / "run_length.py"
    if not src.is_file():
        raise SystemExit(f"ERROR: {src} not found (give a funlib.evaluate checkout)")
    spec = importlib.util.spec_from_file_location(name, src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--funlib", type=Path,
                    help="a checkout of funlib.evaluate from b533ea8 on (the segment rule)")
    ap.add_argument("--funlib-2019", type=Path,
                    help="a checkout of funlib.evaluate at e2b4d90 (the skeleton rule)")
    args = ap.parse_args()
    rules = {rule: load_reference(path, f"funlib_{rule}") for rule, path in
             (("segment", args.funlib), ("skeleton", args.funlib_2019)) if path}
    if not rules:
        ap.error("give --funlib and / or --funlib-2019")
    if not (DATA / "neuroproof_fib_medulla_250").is_dir():
        print(f"SKIP: {DATA}/neuroproof_fib_medulla_250 not present")
        return 0

    from tokenunify.run_length import run_length
    from tokenunify.skeletons import skeletonize

    gt = bodies("groundtruth.h5.gz")
    sv = bodies("oversegmented_stack_labels.h5.gz")
    sk = skeletonize(gt, (10, 10, 10))
    cases = {"ground truth": gt, "supervoxels": sv}
    for n, seed in ((20, 0), (200, 1), (2000, 2)):
        cases[f"supervoxels, {n} pairs merged"] = merged_pairs(sv, n, seed)
    print(f"{len(sk.ids)} skeletons, {len(sk.nodes)} nodes, {sk.edge_nm.sum() / 1000:.1f} um")
    print(f"{'segmentation':<34} {'rule':<8} {'ours nm':>10} {'funlib nm':>10} {'rel diff':>9} "
          f"{'NERL':>6} {'splits':>6} {'merging':>7}")
    worst = 0.0
    for name, seg in cases.items():
        at = sk.segments_at_nodes(seg)
        if np.any(at == 0):
            print(f"{name}: a node lies in segment 0; not comparable")
            continue
        for rule, module in rules.items():
            ours, theirs = run_length(sk, at, rule), funlib_erl(module, sk, at)
            rel = abs(ours.erl_nm - theirs) / max(theirs, 1e-12)
            worst = max(worst, rel)
            print(f"{name:<34} {rule:<8} {ours.erl_nm:>10.2f} {theirs:>10.2f} {rel:>9.1e} "
                  f"{ours.nerl:>6.3f} {ours.split_edges:>6} {ours.merging_segments:>7}")
    print(f"SUMMARY largest relative difference from funlib.evaluate: {worst:.1e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
