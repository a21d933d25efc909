"""Whole-network cost of the Mamba layers: EMmamba vs the same network with identity Mamba.

Forward + backward of one (1, 1, 16, 160, 160) crop on the CPU (2 threads by default), for the
chosen preset (default ``base``, the paper's 28.3 M EMmamba), then the same network with every
MambaV3 replaced by the identity, in one run. Prints the ratio full / identity.
Target: <= 1.5 (exit code 0 when it holds).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import tokenunify.model  # noqa: F401  (flush denormals, as in training)
from tokenunify.model import mamba
from tokenunify.model.emmamba import EMmamba, preset


def fwd_bwd(net, x, repeat):
    """Best wall time of ``repeat`` forward + backward passes, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        net.zero_grad(set_to_none=True)
        t = time.perf_counter()
        net(x).sum().backward()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--crop", type=int, nargs=3, default=(16, 160, 160))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 16x96x96")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.crop = "tiny", (16, 96, 96)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = EMmamba(preset(args.preset))
    x = torch.randn(1, 1, *args.crop)
    # the two variants alternate, so that drift in the shared machine's speed hits both alike
    original = mamba.MambaV3.forward
    t_full = t_id = float("inf")
    for _ in range(args.repeat):
        t_full = min(t_full, fwd_bwd(net, x, 1))
        mamba.MambaV3.forward = lambda self, h: h
        try:
            t_id = min(t_id, fwd_bwd(net, x, 1))
        finally:
            mamba.MambaV3.forward = original
    ratio = t_full / t_id
    print(f"{args.preset} on {tuple(args.crop)}, {args.threads} threads: full {t_full:.2f} s, "
          f"identity-Mamba {t_id:.2f} s (forward + backward, best of {args.repeat})")
    print(f"SUMMARY bench_network: full / identity = {ratio:.2f} (target <= 1.5) -> "
          f"{'PASS' if ratio <= 1.5 else 'FAIL'}")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
