"""Selective scan (Mamba's S6 recurrence): a fast PyTorch path, with mamba_ssm's kernel on CUDA.

The recurrence, per batch b, channel d and state n, along the sequence l::

    delta = softplus(delta + delta_bias)            (if delta_softplus)
    h[l]  = exp(delta[l] * A) * h[l-1] + delta[l] * B[l] * u[l]
    y[l]  = <h[l], C[l]> + D * u[l]
    out   = y * silu(z)                             (if z is given)

:func:`selective_scan_fn` has the signature and shapes of ``mamba_ssm``'s function: u, delta
(B, D, L); A (D, N); B, C (B, N, L) or (B, G, N, L) or, time-invariant, (D, N); D (D,);
z (B, D, L); delta_bias (D,). It computes in float32 (float64 stays float64) and returns the
input dtype.

CPU path: the linear recurrence ``h[l] = a[l] h[l-1] + b[l]`` is solved by a two-level chunked
scan (:class:`LinearScan`): a loop over the ~sqrt(L) positions of a chunk, vectorised over all
chunks at once, then a loop over chunks to carry the state, then one vectorised correction.
That is O(L) work in about 2*sqrt(L) Python steps (450 at L = 51 200) instead of L, and the
decays stay in (0, 1] (cumulative sums of log-decays, no division), so it is stable. Its
backward is the same scan run in reverse (the adjoint of a linear recurrence), written by hand so
autograd does not record every step.

CUDA path: when the tensors are on CUDA and ``mamba_ssm`` imports, its fused kernel is used; the
import is tried at call time and ImportError / RuntimeError fall back to the PyTorch path.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_CUDA_SCAN = None  # cached mamba_ssm function, False once known to be unavailable


def _scan_forward(log_a: torch.Tensor, b: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """h[..., l, :] = exp(log_a[..., l, :]) * h[..., l-1, :] + b[..., l, :]  (h[-1] = 0).

    log_a, b: (..., L, N) with log_a <= 0. Returns h with the same shape.
    """
    L, N = b.shape[-2], b.shape[-1]
    T = chunk or max(1, int(math.ceil(math.sqrt(L))))
    nc = -(-L // T)
    pad = nc * T - L
    if pad:
        log_a = F.pad(log_a, (0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, pad))
    lead = b.shape[:-2]
    # Position-in-chunk first, so every step of the loop touches one contiguous slab.
    la = log_a.reshape(*lead, nc, T, N).movedim(-2, 0).contiguous()  # (T, ..., nc, N)
    h = b.reshape(*lead, nc, T, N).movedim(-2, 0).contiguous()
    a = la.exp()
    # 1. Scan inside every chunk at once, from zero state (in place: h[t] += a[t] * h[t-1]).
    for t in range(1, T):
        h[t].addcmul_(a[t], h[t - 1])
    if nc > 1:
        # 2. Carry the state across chunks: the state entering chunk c.
        decay = la.cumsum_(0).exp_()  # product of a within the chunk up to t, in (0, 1]
        total, last = decay[-1], h[-1]  # (..., nc, N)
        carry = torch.zeros_like(last)
        for c in range(1, nc):
            torch.addcmul(last[..., c - 1, :], total[..., c - 1, :], carry[..., c - 1, :],
                          out=carry[..., c, :])
        # 3. Add the carried state, decayed, to every position.
        h.addcmul_(decay, carry.unsqueeze(0))
    h = h.movedim(0, -2).reshape(*lead, nc * T, N)
    return h[..., :L, :] if pad else h


class LinearScan(torch.autograd.Function):
    """Autograd for the first-order linear recurrence, backward by the reverse scan."""

    @staticmethod
    def forward(ctx, log_a, b):
        h = _scan_forward(log_a, b)
        ctx.save_for_backward(log_a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        log_a, h = ctx.saved_tensors
        # g[l] = grad_h[l] + a[l+1] g[l+1]: the same recurrence, reversed in l.
        la_next = torch.cat([log_a[..., 1:, :], torch.zeros_like(log_a[..., :1, :])], dim=-2)
        g = _scan_forward(la_next.flip(-2), grad_h.contiguous().flip(-2)).flip(-2)
        h_prev = torch.cat([torch.zeros_like(h[..., :1, :]), h[..., :-1, :]], dim=-2)
        grad_log_a = g * h_prev * log_a.exp()
        return grad_log_a, g


def linear_scan(log_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable ``h[l] = exp(log_a[l]) h[l-1] + b[l]`` over dim -2 (see module doc)."""
    return LinearScan.apply(log_a, b)


def _expand_bc(X: torch.Tensor, batch: int, dim: int, length: int) -> torch.Tensor:
    """B or C as (batch, dim|1, length, N) for broadcasting against (batch, dim, length, N)."""
    if X.dim() == 2:  # (D, N): time-invariant
        return X[None, :, None, :]
    if X.dim() == 3:  # (B, N, L)
        return X.transpose(1, 2)[:, None]
    groups = X.shape[1]  # (B, G, N, L)
    X = X.permute(0, 1, 3, 2)  # (B, G, L, N)
    return X.repeat_interleave(dim // groups, dim=1)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False):
    """The selective scan in PyTorch (any device); same contract as :func:`selective_scan_fn`."""
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    B, C = B.to(work), C.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    log_a = delta.unsqueeze(-1) * A[None, :, None, :]  # (B, D, L, N)
    b = (delta * u).unsqueeze(-1) * _expand_bc(B, batch, dim, length)
    h = linear_scan(log_a, b)
    Cx = _expand_bc(C, batch, dim, length)
    y = (h * Cx).sum(-1)  # (B, D, L)
    if D is not None:
        y = y + D.to(work)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    if return_last_state:
        return y, h[:, :, -1, :]
    return y


def _cuda_scan():
    global _CUDA_SCAN
    if _CUDA_SCAN is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
            _CUDA_SCAN = fn
        except (ImportError, RuntimeError, OSError) as exc:
            log.info("mamba_ssm CUDA scan unavailable (%s); using the PyTorch scan", exc)
            _CUDA_SCAN = False
    return _CUDA_SCAN


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, return_last_state=False, backend: str = "auto"):
    """Selective scan; ``backend`` is auto (CUDA kernel if possible), torch, or mamba_ssm.

    Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L), (B, G, N, L) or (D, N);
    D, delta_bias (D,). Returns (B, D, L), plus the last state (B, D, N) if asked.
    """
    if backend != "torch" and u.is_cuda:
        fn = _cuda_scan()
        if fn:
            try:
                return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
            except RuntimeError as exc:
                if backend == "mamba_ssm":
                    raise
                log.warning("mamba_ssm scan failed (%s); falling back to PyTorch", exc)
        elif backend == "mamba_ssm":
            raise RuntimeError("backend 'mamba_ssm' requested but mamba_ssm's CUDA scan does not "
                               "import; install the cuda extra (README, Install)")
    elif backend == "mamba_ssm":
        raise RuntimeError("backend 'mamba_ssm' needs CUDA tensors")
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_last_state)
