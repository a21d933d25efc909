"""Selective scan speed: tokenunify's chunked scan vs a step-by-step loop and mambapy's pscan.

Forward + backward of the S6 recurrence at B=1, D=64, N=16 and L=51 200 (the first Mamba stage
of the ``base`` preset on a 16x160x160 crop), float32 on the CPU, all three on the same inputs
in one run. The step-by-step loop is timed at ``--loop-length`` (default 4096) because it is
far too slow at 51 200; its time is compared with ours at the same length.
Criteria: ours >= 20x faster than the loop, and >= 2x faster than mambapy's pscan.
Exit code 0 when both hold.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import tokenunify.model  # noqa: F401  (flush denormals, as in training)
from tokenunify.model.scan import selective_scan_torch


def inputs(L, D=64, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(1, D, L, generator=g), torch.randn(1, D, L, generator=g) - 1,
         -torch.rand(D, N, generator=g) * 4, torch.randn(1, N, L, generator=g),
         torch.randn(1, N, L, generator=g), torch.randn(D, generator=g),
         torch.randn(1, D, L, generator=g), torch.randn(D, generator=g)]
    return [x.requires_grad_() for x in t]


def loop_scan(u, delta, A, B, C, D, z, delta_bias):
    delta = F.softplus(delta + delta_bias[:, None])
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[-1]):
        h = torch.exp(delta[:, :, i, None] * A) * h + delta[:, :, i, None] * B[:, None, :, i] \
            * u[:, :, i, None]
        ys.append((h * C[:, None, :, i]).sum(-1))
    return (torch.stack(ys, -1) + D[:, None] * u) * F.silu(z)


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The same scan through mambapy's Blelloch pscan (its layout is (B, L, D, N))."""
    from mambapy.pscan import pscan

    delta = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (B, L, D)
    dA = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, D, N)
    BX = delta.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * u.transpose(1, 2).unsqueeze(-1)
    hs = pscan(dA, BX)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    return (y + D[:, None] * u) * F.silu(z)


def ours(*a):
    return selective_scan_torch(*a[:7], delta_bias=a[7], delta_softplus=True)


def timed(fn, args, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        for x in args:
            x.grad = None
        t = time.perf_counter()
        fn(*args).sum().backward()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=51200)
    ap.add_argument("--loop-length", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="L=6400, loop at 1024")
    args = ap.parse_args()
    if args.quick:
        args.length, args.loop_length = 6400, 1024
    torch.manual_seed(0)
    x = inputs(args.length)
    with torch.no_grad():  # agreement with mambapy on the same inputs
        diff = (ours(*x) - mambapy_scan(*x)).abs().max().item()
    t_ours = timed(ours, x)
    t_pscan = timed(mambapy_scan, x)
    xl = inputs(args.loop_length)
    t_loop = timed(loop_scan, xl, repeat=1)
    t_ours_l = timed(ours, xl)
    r_loop, r_pscan = t_loop / t_ours_l, t_pscan / t_ours
    ok = r_loop >= 20 and r_pscan >= 2
    print(f"L={args.length}: ours fwd+bwd {t_ours:.3f} s, mambapy pscan {t_pscan:.3f} s "
          f"(max |diff| {diff:.2e}); L={args.loop_length}: loop {t_loop:.3f} s, ours "
          f"{t_ours_l:.3f} s")
    print(f"SUMMARY bench_scan: ours vs loop {r_loop:.1f}x (need >= 20x), ours vs mambapy pscan "
          f"{r_pscan:.2f}x (need >= 2x) -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
