"""The three-scan ("v3") bidirectional Mamba block of SegMamba / TokenUnify.

One ``in_proj`` and one ``out_proj`` are shared by three independent selective-scan branches,
each with its own causal depthwise conv, ``x_proj``, ``dt_proj``, ``A_log`` and ``D``:

- forward: the sequence in its natural order (``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``);
- backward: the sequence reversed (suffix ``_b``);
- slice: the sequence cut into ``nslices`` contiguous pieces that are interleaved, position p of
  piece c going to p * nslices + c (suffix ``_s``).

``out = out_proj(y_forward + y_backward + y_slice)``. Parameter names and shapes are those of the
official checkpoints (the official code, github.com/ydchen0806/TokenUnify, ``model_segmamba``),
so their weights load unchanged. ``nslices`` is 5 in the official weights; it is a parameter
here (any divisor of the sequence length works, and a length that 5 does not divide is padded
to the next multiple and cropped back).

Initialisation follows upstream Mamba: ``A_log = log(1..N)``, ``D = 1``, ``dt_proj`` bias the
inverse softplus of a log-uniform dt in [dt_min, dt_max], ``dt_proj`` weight uniform in
+-dt_rank^-0.5 * dt_scale, PyTorch defaults elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenunify.model.scan import selective_scan_fn

BRANCHES = ("", "_b", "_s")
_CAUSAL_CONV = None  # causal_conv1d_fn once imported, False when unavailable


def causal_conv_silu(x: torch.Tensor, conv: nn.Conv1d, backend: str = "auto") -> torch.Tensor:
    """SiLU(causal depthwise conv(x)) on (B, E, L): the ``causal_conv1d`` CUDA kernel when the
    tensor is on CUDA and it imports (checked at call time), else ``nn.Conv1d`` + crop."""
    global _CAUSAL_CONV
    if x.is_cuda and backend != "torch":
        if _CAUSAL_CONV is None:
            try:
                from causal_conv1d import causal_conv1d_fn
                _CAUSAL_CONV = causal_conv1d_fn
            except (ImportError, RuntimeError, OSError):
                _CAUSAL_CONV = False
        if _CAUSAL_CONV:
            try:
                return _CAUSAL_CONV(x, conv.weight.squeeze(1), conv.bias, activation="silu")
            except RuntimeError:
                pass
    return F.silu(conv(x)[..., : x.shape[-1]])


class MambaV3(nn.Module):
    """Bidirectional + slice Mamba mixer. Input and output (batch, length, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, nslices: int = 5,
                 backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.nslices, self.backend = nslices, backend
        E, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.out_proj = nn.Linear(E, d_model, bias=bias)
        A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1).contiguous()
        for sfx in BRANCHES:
            setattr(self, f"conv1d{sfx}", nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1,
                                                    bias=conv_bias))
            setattr(self, f"x_proj{sfx}", nn.Linear(E, R + 2 * N, bias=False))
            dt_proj = nn.Linear(R, E, bias=True)
            std = R**-0.5 * dt_scale
            if dt_init == "constant":
                nn.init.constant_(dt_proj.weight, std)
            elif dt_init == "random":
                nn.init.uniform_(dt_proj.weight, -std, std)
            else:
                raise ValueError(f"dt_init must be 'constant' or 'random', not {dt_init!r}")
            dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            dt_proj.bias._no_reinit = True
            setattr(self, f"dt_proj{sfx}", dt_proj)
            a_name = "A_log" if sfx == "" else f"A{sfx}_log"
            setattr(self, a_name, nn.Parameter(A_log.clone()))
            getattr(self, a_name)._no_weight_decay = True
            setattr(self, f"D{sfx}", nn.Parameter(torch.ones(E)))
            getattr(self, f"D{sfx}")._no_weight_decay = True

    def _branch(self, x: torch.Tensor, z: torch.Tensor, sfx: str) -> torch.Tensor:
        """One selective-scan branch on (B, E, L) inputs already in its order."""
        x = causal_conv_silu(x, getattr(self, f"conv1d{sfx}"), self.backend)
        x_dbl = F.linear(x.transpose(1, 2), getattr(self, f"x_proj{sfx}").weight)  # (B, L, R+2N)
        dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_proj = getattr(self, f"dt_proj{sfx}")
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, E, L), bias added in the scan
        A = -torch.exp(getattr(self, "A_log" if sfx == "" else f"A{sfx}_log").float())
        # B, C as (B, N, L) views; each scan backend makes the layout it needs
        return selective_scan_fn(x, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2),
                                 getattr(self, f"D{sfx}").float(),
                                 z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
                                 backend=self.backend)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, length, d_model) -> (batch, length, d_model)."""
        B, L, _ = hidden.shape
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)
        y = self._branch(x, z, "")
        y = y + self._branch(x.flip(-1), z.flip(-1), "_b").flip(-1)
        s = self.nslices
        pad = (-L) % s
        xs, zs = (F.pad(x, (0, pad)), F.pad(z, (0, pad))) if pad else (x, z)
        Lp = L + pad

        def interleave(t):  # (B, E, s*P) -> (B, E, P*s): piece c, position p -> p*s + c
            return t.reshape(B, -1, s, Lp // s).transpose(2, 3).reshape(B, -1, Lp)

        ys = self._branch(interleave(xs), interleave(zs), "_s")
        ys = ys.reshape(B, -1, Lp // s, s).transpose(2, 3).reshape(B, -1, Lp)[..., :L]
        return self.out_proj((y + ys).transpose(1, 2))
