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
scan (:func:`_scan_chunked`): a loop over the ~sqrt(L) positions of a chunk, vectorised over all
chunks at once, then a loop over chunks to carry the state, then one vectorised correction.
That is O(L) work in about 2*sqrt(L) Python steps (450 at L = 51 200) instead of L, and the
decays stay in (0, 1] (cumulative sums of log-decays, no division), so it is stable. Its
backward is the same scan run in reverse (the adjoint of a linear recurrence), written by hand so
autograd does not record every step.

Fused CPU path: for float32 CPU tensors with input-dependent B and C (Mamba's case), a small
C++ kernel (``scan_cpu.cpp``, built once with torch's JIT extension builder and ninja, cached in
torch's extension folder) runs the whole scan row by row: softplus of delta + bias, the
recurrence, the D skip and the SiLU(z) gate in one pass, keeping one state per 64 positions; the
backward pass recomputes each 64-position chunk from its checkpoint. It is built for the
instruction set torch reports (AVX-512, AVX2 or generic), under a name per set, so a build cached
on a shared home directory is never loaded by a CPU that lacks its instructions. If the build
fails (no compiler) or ``TOKENUNIFY_FUSED_SCAN=0``, the chunked PyTorch scan is used; both are
tested against the same float64 reference.

CUDA path: when the tensors are on CUDA and ``mamba_ssm`` imports, its fused kernel is used; the
import is tried at call time and ImportError / RuntimeError fall back to the PyTorch path.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_CUDA_SCAN = None  # cached mamba_ssm function, False once known to be unavailable


# Instruction sets the fused kernel is built for, by torch's own CPU capability check. Each gets
# its own build name, so a build cached on a shared home directory is never loaded by a node
# whose CPU lacks the instructions.
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "generic": [],
}


def _cpu_isa() -> str:
    """'avx512', 'avx2' or 'generic' (x86 capability as torch reports it; generic elsewhere)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return "avx512" if cap.startswith("avx512") else "avx2" if cap == "avx2" else "generic"


def fused_cpu_extension():
    """The fused CPU scan extension, built on first use; None when unavailable or disabled
    (``TOKENUNIFY_FUSED_SCAN=0``)."""
    from tokenunify.native import optional_extension

    isa = _cpu_isa()
    return optional_extension(
        f"tokenunify_scan_cpu_{isa}", Path(__file__).with_name("scan_cpu.cpp"),
        ["-O3", "-ffast-math", "-fopenmp", *_ISA_FLAGS[isa]], ["-fopenmp"],
        disable_env="TOKENUNIFY_FUSED_SCAN", fallback="the chunked PyTorch scan")


class FusedScan(torch.autograd.Function):
    """The whole selective scan through the C++ kernel, softplus, skip and gate included.

    u, delta, z (B, D, L); A (D, N); Bt, Ct (B, L, N); Dskip, bias (D,); z, Dskip and bias may
    be None. Returns out (B, D, L). Keeps one state per 64 positions for the backward pass.
    """

    @staticmethod
    def forward(ctx, u, delta, A, Bt, Ct, Dskip, z, bias, softplus):
        empty = u.new_empty(0)
        opt = [t.contiguous() if t is not None else empty for t in (Dskip, z, bias)]
        out, Hc = fused_cpu_extension().forward(u, delta, A, Bt, Ct, *opt, softplus)
        ctx.save_for_backward(u, delta, A, Bt, Ct, *opt, Hc)
        ctx.softplus, ctx.present = softplus, [t is not None for t in (Dskip, z, bias)]
        return out

    @staticmethod
    def backward(ctx, gout):
        u, delta, A, Bt, Ct, Dskip, z, bias, Hc = ctx.saved_tensors
        du, dd, dA, dB, dC, dD, dz, dbias = fused_cpu_extension().backward(
            gout.contiguous(), u, delta, A, Bt, Ct, Dskip, z, bias, ctx.softplus, Hc)
        has_D, has_z, has_bias = ctx.present
        return (du, dd, dA, dB, dC, dD if has_D else None, dz if has_z else None,
                dbias if has_bias else None, None)


def _chunking(L: int) -> tuple[int, int]:
    """(chunk length T, number of chunks) with T about sqrt(L)."""
    T = max(1, int(math.ceil(math.sqrt(L))))
    return T, -(-L // T)


def _scan_chunked(la: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Solve the recurrence on chunk-major tensors (T, ..., nc, N), in place on ``b``.

    Forward:  h[t, c] = exp(la[t, c]) * h[t-1, c] + b[t, c], flowing from chunk c-1 into c.
    Reverse:  h[t, c] = exp(la[t, c]) * h[t+1, c] + b[t, c], flowing from chunk c+1 into c.
    Sequence position l = c * T + t. The returned tensor is ``b`` itself.
    """
    T, nc = la.shape[0], la.shape[-2]
    h = b
    # exp of very negative numbers takes a slow underflow path (~6x slower); exp(-80) ~ 2e-35
    # is already 0 for all purposes here.
    a = la.clamp(min=-80.0).exp_()
    # decay[t]: product of a from the chunk's entry edge to t (cumulative, by the same loop;
    # a loop of slab products is ~15x faster than cumsum along dim 0 plus exp on the CPU)
    decay = a.clone() if nc > 1 else None
    steps = range(T - 2, -1, -1) if reverse else range(1, T)
    for t in steps:  # 1. inside every chunk at once, from zero state
        prev = t + 1 if reverse else t - 1
        h[t].addcmul_(a[t], h[prev])
        if decay is not None:
            decay[t].mul_(decay[prev])
    if nc == 1:
        return h
    # 2. the state carried across chunk edges, chunk by chunk
    if reverse:
        edge, total, order, up = h[0], decay[0], range(nc - 2, -1, -1), 1
    else:
        edge, total, order, up = h[-1], decay[-1], range(1, nc), -1
    carry = torch.zeros_like(edge)
    for c in order:  # state entering chunk c = edge value of its upstream neighbour
        torch.addcmul(edge[..., c + up, :], total[..., c + up, :], carry[..., c + up, :],
                      out=carry[..., c, :])
    # 3. add the carried state, decayed, everywhere
    h.addcmul_(decay, carry.unsqueeze(0))
    return h


def _to_chunks(t: torch.Tensor, T: int, nc: int) -> torch.Tensor:
    """(B, D, L) -> chunk-major (T, B, D, nc), zero-padded to nc * T."""
    pad = nc * T - t.shape[-1]
    if pad:
        t = F.pad(t, (0, pad))
    # contiguous, so that products with it are laid out chunk-major too (fast loop slices)
    return t.reshape(*t.shape[:-1], nc, T).movedim(-1, 0).contiguous()


def _bc_chunks(X: torch.Tensor, dim: int, T: int, nc: int) -> torch.Tensor:
    """B or C as chunk-major (T, B|1, D|1, nc, N) for broadcasting."""
    if X.dim() == 2:  # (D, N): time-invariant
        return X[None, None, :, None, :]
    if X.dim() == 4:  # (B, G, N, L): groups share B/C
        X = X.repeat_interleave(dim // X.shape[1], dim=1)
    else:  # (B, N, L)
        X = X[:, None]
    pad = nc * T - X.shape[-1]
    if pad:
        X = F.pad(X, (0, pad))
    return X.reshape(*X.shape[:-1], nc, T).permute(4, 0, 1, 3, 2).contiguous()


def _groups(D: int, per_channel_bytes: int, target: int = 16 << 20) -> list[tuple[int, int]]:
    """Channel ranges whose (T, B, g, nc, N) tensors stay near ``target`` bytes.

    Big temporaries are where the CPU time goes: every fresh 200 MB tensor is mmap-ed and
    page-faulted anew, and does not fit in cache. Groups of a few MB are recycled by malloc and
    stay in cache. 16 MB balances that against the Python steps per group (measured on the
    first stage of ``base``, one layer forward + backward: 13.8 s unsplit, 5.1 s at 4 MB,
    3.0-3.4 s at 16 MB, 5.8 s at 64 MB)."""
    g = max(1, target // max(1, per_channel_bytes))
    return [(d0, min(D, d0 + g)) for d0 in range(0, D, g)]


def _slice_d(X: torch.Tensor, d0: int, d1: int) -> torch.Tensor:
    return X[:, :, d0:d1] if X.shape[2] > 1 else X


def _shift_next(la: torch.Tensor) -> torch.Tensor:
    """log-decay applying from position l+1 back to l, in chunk-major layout (0 past the end)."""
    nxt = torch.empty_like(la)
    nxt[:-1] = la[1:]
    nxt[-1, ..., :-1, :] = la[0, ..., 1:, :]
    nxt[-1, ..., -1, :] = 0.0
    return nxt


class SelectiveScan(torch.autograd.Function):
    """y = sum_n h * C with h the S6 recurrence, on chunk-major inputs, channel group by group.

    Inputs (chunk-major, see :func:`_to_chunks`): u, delta (T, B, D, nc) with delta already
    biased and softplus-ed; A (D, N); Bc, Cc (T|1, B|1, D|1, nc|1, N). Returns y (T, B, D, nc)
    and keeps each group's states h for the backward pass.
    """

    @staticmethod
    def forward(ctx, u, delta, A, Bc, Cc):
        T, batch, D, nc = u.shape
        N = A.shape[1]
        groups = _groups(D, T * batch * nc * N * u.element_size())
        y = torch.empty_like(u)
        states = []
        for d0, d1 in groups:
            dg, ug = delta[:, :, d0:d1], u[:, :, d0:d1]
            la = dg.unsqueeze(-1) * A[d0:d1][None, None, :, None, :]
            h = _scan_chunked(la, (dg * ug).unsqueeze(-1) * _slice_d(Bc, d0, d1))
            y[:, :, d0:d1] = (h * _slice_d(Cc, d0, d1)).sum(-1)
            states.append(h)
        ctx.save_for_backward(u, delta, A, Bc, Cc)
        ctx.groups, ctx.states = groups, states
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, Bc, Cc = ctx.saved_tensors
        gy = gy.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA, dB, dC = torch.zeros_like(A), torch.zeros_like(Bc), torch.zeros_like(Cc)
        for (d0, d1), h in zip(ctx.groups, ctx.states, strict=True):
            dg, ug, gyg = delta[:, :, d0:d1], u[:, :, d0:d1], gy[:, :, d0:d1]
            Ag = A[d0:d1][None, None, :, None, :]
            Bg, Cg = _slice_d(Bc, d0, d1), _slice_d(Cc, d0, d1)
            la = dg.unsqueeze(-1) * Ag
            # dL/dh from y, then the adjoint recurrence run backwards: g = dL/d(state input)
            g = _scan_chunked(_shift_next(la), gyg.unsqueeze(-1) * Cg, reverse=True)
            dCg = (gyg.unsqueeze(-1) * h).sum_to_size(Cg.shape)
            du_dt = (dg * ug).unsqueeze(-1)
            # a * h_prev = h - b (b = delta u B), so dL/dla = g * (h - b)
            gla = g * (h - du_dt * Bg)
            gB = (g * Bg).sum(-1)
            ddelta[:, :, d0:d1] = (gla * Ag).sum(-1) + ug * gB
            du[:, :, d0:d1] = dg * gB
            dA[d0:d1] = (gla * dg.unsqueeze(-1)).sum((0, 1, 3))
            dBg = (g * du_dt).sum_to_size(Bg.shape)
            if Bc.shape[2] > 1:
                dB[:, :, d0:d1] += dBg
                dC[:, :, d0:d1] += dCg
            else:
                dB += dBg
                dC += dCg
        return du, ddelta, dA, dB, dC


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False):
    """The selective scan in PyTorch (any device); same contract as :func:`selective_scan_fn`."""
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    if (work == torch.float32 and not u.is_cuda and B.dim() == 3 and C.dim() == 3
            and A.shape[1] <= 64 and fused_cpu_extension() is not None):
        f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
        out = FusedScan.apply(f32(u), f32(delta), f32(A), f32(B.transpose(1, 2)),
                              f32(C.transpose(1, 2)), f32(D), f32(z), f32(delta_bias),
                              bool(delta_softplus)).to(dtype_in)
        if not return_last_state:
            return out
        delta = delta.float() + (0 if delta_bias is None else delta_bias.float()[:, None])
        delta = F.softplus(delta) if delta_softplus else delta
        T, nc = _chunking(u.shape[-1])
        return out, _last_state(u.float(), delta, A.float(), B.float(), T, nc)
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    B, C = B.to(work), C.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    T, nc = _chunking(length)
    # chunk-major; padding has delta 0 (decay 1) and input 0, so it changes nothing before it
    d_c, u_c = _to_chunks(delta, T, nc), _to_chunks(u, T, nc)
    Bc, Cc = _bc_chunks(B, dim, T, nc), _bc_chunks(C, dim, T, nc)
    y = SelectiveScan.apply(u_c, d_c, A, Bc, Cc)  # (T, B, D, nc)
    y = y.movedim(0, -1).reshape(batch, dim, nc * T)[..., :length]
    return _finish(y, u, D, z, dtype_in, return_last_state, (delta, A, B))


def _finish(y, u, D, z, dtype_in, return_last_state, state_inputs):
    """Skip connection D * u, SiLU(z) gate, dtype, optional last state."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(dtype_in)
    if return_last_state:
        delta, A, B = state_inputs
        T, nc = _chunking(u.shape[-1])
        return y, _last_state(u, delta, A, B, T, nc)
    return y


def _last_state(u, delta, A, B, T, nc):
    """State after the last position, (B, D, N) (recomputed; only for return_last_state)."""
    with torch.no_grad():
        d_c = _to_chunks(delta, T, nc)
        la = d_c.unsqueeze(-1) * A[None, None, :, None, :]
        b = (d_c * _to_chunks(u, T, nc)).unsqueeze(-1) * _bc_chunks(B, u.shape[1], T, nc)
        h = _scan_chunked(la, b)
    last = u.shape[-1] - 1
    return h[last % T, :, :, last // T, :]


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
