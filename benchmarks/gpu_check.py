"""Every check that needs a GPU, in one run (called by ``benchmarks/gpu_check.sh``).

Needs only torch and ``tokenunify.model`` (the GPU machines have no zarr or dask), so it runs
from a bare checkout with ``PYTHONPATH=.``. Prints one line per check and a SUMMARY line:

1. scan: the selective scan on the GPU (mamba_ssm's CUDA kernel when it imports, else our
   chunked PyTorch scan on CUDA) against the CPU scan on the same inputs, forward and backward
   (max abs / rel error), and its speed;
2. train: one ``base`` EMmamba step of pretraining (1 output channel, MSE) and of fine-tuning
   (3 channels, weighted MSE) in bf16 autocast: ms per step, voxels/s and tokens/s, peak memory;
3. infer: a block of ``--block`` voxels predicted window by window (the model's window, the
   pipeline's half-window overlap, Gaussian blending) in bf16: voxels/s of finished output, and
   the ratio to the floor set by the forward FLOPs at the measured bf16 matmul rate.

``--device cpu --quick`` runs the same code on the CPU (tiny model, small sizes) so that the
script itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F

from tokenunify.model.emmamba import EMmamba, preset
from tokenunify.model.scan import _cuda_scan, selective_scan_fn


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check_scan(device, L: int) -> dict:
    g = torch.Generator().manual_seed(0)
    Bt, D, N = 2, 64, 16
    cpu = {"u": torch.randn(Bt, D, L, generator=g), "delta": torch.randn(Bt, D, L, generator=g),
           "A": -torch.rand(D, N, generator=g) * 4, "B": torch.randn(Bt, N, L, generator=g),
           "C": torch.randn(Bt, N, L, generator=g), "D": torch.randn(D, generator=g),
           "z": torch.randn(Bt, D, L, generator=g), "delta_bias": torch.randn(D, generator=g)}
    dev = {k: v.to(device).requires_grad_() for k, v in cpu.items()}
    cpu = {k: v.requires_grad_() for k, v in cpu.items()}
    y_c = selective_scan_fn(**cpu, delta_softplus=True, backend="torch")
    y_d = selective_scan_fn(**dev, delta_softplus=True)
    gy = torch.randn_like(y_c)
    g_c = torch.autograd.grad(y_c, list(cpu.values()), gy)
    g_d = torch.autograd.grad(y_d, list(dev.values()), gy.to(device))
    scale = y_c.abs().max().item()
    err = (y_d.detach().cpu() - y_c.detach()).abs().max().item()
    gerr = max(((a.cpu() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
               for a, b in zip(g_d, g_c, strict=True))
    s = timed(lambda: selective_scan_fn(**{k: v.detach() for k, v in dev.items()},
                                        delta_softplus=True), device, 5)
    kernel = "mamba_ssm" if device.type == "cuda" and _cuda_scan() else "torch"
    return {"check": "scan", "kernel": kernel, "L": L, "max_abs_err": err,
            "max_rel_err": err / max(scale, 1e-6), "grad_max_rel_err": gerr,
            "ms": 1e3 * s, "ok": err / max(scale, 1e-6) < 1e-3 and gerr < 1e-2}


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_step(net, opt, x, target, weight, finetune: bool, device) -> None:
    """One optimiser step: MSE (pretraining) or weighted MSE of sigmoid (fine-tuning)."""
    with autocast(device):
        pred = net(x).float()
    if finetune:
        loss = (weight * (torch.sigmoid(pred) - target) ** 2).mean()
    else:
        loss = F.mse_loss(pred, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()}")


def check_train(device, model: str, crop, batch: int) -> list[dict]:
    out = []
    for stage, channels in (("pretrain", 1), ("finetune", 3)):
        torch.manual_seed(0)
        net = EMmamba(preset(model, out_channels=channels)).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(batch, 1, *crop, device=device)
        target = torch.rand(batch, channels, *crop, device=device)
        weight = torch.rand_like(target)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        s = timed(functools.partial(train_step, net, opt, x, target, weight,
                                    stage == "finetune", device), device, 5)
        vox = batch * crop[0] * crop[1] * crop[2]
        out.append({"check": "train", "stage": stage, "model": model, "crop": list(crop),
                    "batch": batch, "ms_per_step": 1e3 * s, "voxels_per_s": vox / s,
                    "tokens_per_s": vox / (4 * 16 * 16) / s,
                    "peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                                 if device.type == "cuda" else None), "ok": True})
    return out


def forward_flops(net, window, device) -> float:
    """FLOPs of one forward pass of one window (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 1, *window, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc, autocast(device):
        net(x)
    return float(fc.get_total_flops())


def matmul_rate(device, n: int) -> float:
    """Measured matmul FLOP/s (bf16 on GPUs, fp32 on the CPU) at n x n x n."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, 10)


def check_infer(device, model: str, window, block, batch: int) -> dict:
    torch.manual_seed(0)
    net = EMmamba(preset(model, out_channels=3)).to(device).eval()
    step = [w // 2 for w in window]
    starts = [range(0, max(b - w, 0) + 1, s) for b, w, s in zip(block, window, step, strict=True)]
    wins = list(itertools.product(*starts))
    raw = torch.rand(1, 1, *block, device=device)

    def run():
        acc = torch.zeros(3, *block, device=device)
        for i in range(0, len(wins), batch):
            chunk = wins[i:i + batch]
            x = torch.cat([raw[..., z:z + window[0], y:y + window[1], w:w + window[2]]
                           for z, y, w in chunk])
            with torch.no_grad(), autocast(device):
                p = torch.sigmoid(net(x).float())
            for (z, y, w), pi in zip(chunk, p, strict=True):
                acc[:, z:z + window[0], y:y + window[1], w:w + window[2]] += pi
        return acc

    s = timed(run, device, 3)
    vox = block[0] * block[1] * block[2]
    flops = forward_flops(net, window, device) * len(wins)
    rate = matmul_rate(device, 8192 if device.type == "cuda" else 1024)
    floor = flops / rate
    return {"check": "infer", "model": model, "window": list(window), "block": list(block),
            "windows": len(wins), "s": s, "voxels_per_s": vox / s,
            "floor_voxels_per_s": vox / floor, "fraction_of_floor": floor / s,
            "matmul_tflops": rate / 1e12, "ok": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model and small sizes")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu --quick to test the script)")
        return 2
    device = torch.device(args.device)
    model = "tiny" if args.quick else "base"
    crop = (16, 64, 64) if args.quick else (16, 160, 160)
    window = (16, 64, 64) if args.quick else (16, 160, 160)
    block = (32, 128, 128) if args.quick else (64, 640, 640)
    results = [check_scan(device, 4096 if args.quick else 51200)]
    results += check_train(device, model, crop, 2 if args.quick else 8)
    results.append(check_infer(device, model, window, block, 2 if args.quick else 16))
    for r in results:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    ok = all(r["ok"] for r in results)
    inf = results[-1]
    print(f"SUMMARY gpu_check on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f": scan {results[0]['kernel']} rel err {results[0]['max_rel_err']:.1e}; {model} "
          f"finetune step {results[2]['ms_per_step']:.0f} ms; infer "
          f"{inf['voxels_per_s'] / 1e6:.2f} Mvox/s = {100 * inf['fraction_of_floor']:.0f} % of "
          f"the FLOP floor ({inf['floor_voxels_per_s'] / 1e6:.1f} Mvox/s): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
