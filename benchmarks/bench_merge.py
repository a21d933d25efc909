"""The global merge: compiled (merge_cpu.cpp) vs the Python reference, side by side.

Synthetic 3-D grids of fragments (n^3 fragments, 6-neighbour edges: 3 n^2 (n - 1)), each edge
with a random sample count, sum and maximum, merged up to 0.9 with the default quantile scoring
(the issue's measurement: 8 000 / 64 000 / 512 000 fragments took 0.6 / 6.5 / 89.7 s in
Python). Each engine runs in a fresh subprocess, so its peak RSS (VmHWM, peak_rss.py) is its own; the
graph building is timed apart from the merge. Prints per size: fragments, edges, merge seconds
of each engine (the median of --repeat), the ratio, the ratio of each process's first merge
(what a job that merges once pays, fresh pages included), peak RSS and the RSS above a process
that only built the graph, per edge. Both engines produce the identical history (checked here
on the merge count and in tests/agglomerate/test_merge_compiled.py on the full history).

    python benchmarks/bench_merge.py            # n = 20, 40, 80 (the largest: 1.5 M edges)
    python benchmarks/bench_merge.py --n 20 40  # quicker
    python benchmarks/bench_merge.py --n 80 --repeat 3  # the median of 3 merges per engine
    python benchmarks/bench_merge.py --n 40 80 --repeat 3 --against 7fb919d  # and the issue's
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from peak_rss import peak_rss_gb

SCORING = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256>>"


def grid_graph(n: int, seed: int = 0) -> pd.DataFrame:
    """Edges (u < v, count, sum, max) of an n x n x n grid of fragments, ids 1..n^3."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, n ** 3 + 1, dtype=np.int64).reshape(n, n, n)
    pairs = [(ids[1:], ids[:-1]), (ids[:, 1:], ids[:, :-1]), (ids[:, :, 1:], ids[:, :, :-1])]
    u = np.concatenate([b.ravel() for _, b in pairs])
    v = np.concatenate([a.ravel() for a, _ in pairs])
    count = rng.integers(1, 40, len(u))
    mean = rng.beta(4, 2, len(u))
    return pd.DataFrame({"u": u, "v": v, "count": count, "sum": mean * count,
                         "max": np.minimum(mean + rng.uniform(0, 0.2, len(u)), 1.0)})


def child(n: int, engine: str, repeat: int = 1) -> None:
    from tokenunify.agglomerate.merge import agglomerate_graph, compiled_extension
    from tokenunify.agglomerate.scoring import parse

    if engine == "compiled":
        compiled_extension()  # load the cached build before measuring
    if engine.startswith("python@"):  # the Python merge of an earlier commit, from git
        agglomerate_graph = merge_at(engine[len("python@"):])
        engine = "python"
    edges = grid_graph(n)
    base = peak_rss_gb() * 2**20
    merges, times, peak = 0, [], 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        if engine != "none":
            merges = len(agglomerate_graph(edges, n ** 3, parse(SCORING), 0.9, engine=engine).u)
        times.append(time.perf_counter() - t0)
        peak = peak or peak_rss_gb() * 2**20  # the first merge's: later ones reuse freed space
    dt = float(np.median(times))
    print(json.dumps({"seconds": dt, "first": times[0], "merges": merges, "edges": len(edges),
                      "peak_kb": peak, "graph_kb": base}))


def merge_at(commit: str):
    """``agglomerate_graph`` of ``tokenunify/agglomerate/merge.py`` at ``commit`` (read with
    ``git show``; it must take the same arguments), for the ratio against an older merge."""
    import types

    where = f"{commit}:tokenunify/agglomerate/merge.py"
    text = subprocess.run(["git", "-C", str(Path(__file__).parent), "show", where], check=True,
                          capture_output=True, text=True).stdout
    module = types.ModuleType(f"merge_{commit}")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(text, where, "exec"), module.__dict__)

    def run(edges, n_fragments, scoring, threshold, engine="python"):
        return module.agglomerate_graph(edges, n_fragments, scoring, threshold)
    return run


def measure(n: int, engine: str, repeat: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(n), engine, str(repeat)],
                         check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[20, 40, 80], help="grid edge lengths")
    ap.add_argument("--repeat", type=int, default=1,
                    help="merges per engine and size in its process (the median is printed)")
    ap.add_argument("--against", metavar="COMMIT",
                    help="also time the Python merge of an earlier commit (e.g. 7fb919d, the "
                         "one issue 13 measured) against the compiled one")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], int(args.child[2]))
        return 0
    from tokenunify.agglomerate.merge import compiled_extension

    if compiled_extension() is None:
        print("SKIP: the compiled merge does not build here")
        return 0
    print(f"{'fragments':>10} {'edges':>10} {'python s':>9} {'compiled s':>10} {'ratio':>6} "
          f"{'1st ratio':>9} {'py RSS MB':>9} {'c RSS MB':>8} {'py B/edge':>9} {'c B/edge':>8}")
    for n in args.n:
        py, c = measure(n, "python", args.repeat), measure(n, "compiled", args.repeat)
        if py["merges"] != c["merges"]:
            print(f"MISMATCH: {py['merges']} python merges vs {c['merges']} compiled")
            return 1
        per = {k: 1024 * (r["peak_kb"] - r["graph_kb"]) / r["edges"] for k, r in
               (("py", py), ("c", c))}
        print(f"{n ** 3:>10} {py['edges']:>10} {py['seconds']:>9.2f} {c['seconds']:>10.3f} "
              f"{py['seconds'] / c['seconds']:>6.1f} {py['first'] / c['first']:>9.1f} "
              f"{py['peak_kb'] / 1024:>9.0f} "
              f"{c['peak_kb'] / 1024:>8.0f} {per['py']:>9.0f} {per['c']:>8.0f}", flush=True)
    if args.against:
        old = measure(args.n[-1], f"python@{args.against}", args.repeat)
        if old["merges"] != c["merges"]:
            print(f"MISMATCH: {old['merges']} merges at {args.against} vs {c['merges']}")
            return 1
        print(f"SUMMARY the Python merge of {args.against}: {old['seconds']:.2f} s, the compiled "
              f"merge {old['seconds'] / c['seconds']:.1f}x that ({old['first'] / c['first']:.1f}x "
              f"on first merges)")
    print(f"SUMMARY compiled merge: {py['seconds'] / c['seconds']:.1f}x the Python merge on "
          f"{py['edges']} edges ({c['merges']} merges; {py['first'] / c['first']:.1f}x on "
          f"each process's first merge, {c['first']:.2f} s compiled); {per['c']:.0f} vs "
          f"{per['py']:.0f} bytes per edge above the graph table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
