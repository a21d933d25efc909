"""The fast selective scan against a sequential float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenunify.model  # noqa: F401
from tokenunify.model.scan import _scan_chunked, selective_scan_fn


def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Step-by-step float64 recurrence (mamba_ssm's selective_scan_ref math)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    if B.dim() == 2:
        Bt = lambda i: B[None]  # noqa: E731
    elif B.dim() == 3:
        Bt = lambda i: B[:, None, :, i]  # noqa: E731
    else:
        Bt = lambda i: B[:, :, :, i].repeat_interleave(dim // B.shape[1], 1)  # noqa: E731
    if C.dim() == 2:
        Ct = lambda i: C[None]  # noqa: E731
    elif C.dim() == 3:
        Ct = lambda i: C[:, None, :, i]  # noqa: E731
    else:
        Ct = lambda i: C[:, :, :, i].repeat_interleave(dim // C.shape[1], 1)  # noqa: E731
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for i in range(length):
        h = torch.exp(delta[:, :, i, None] * A) * h + delta[:, :, i, None] * Bt(i) * u[:, :, i, None]
        ys.append((h * Ct(i)).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def make(batch, dim, n, length, bc="var", groups=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    if bc == "var":
        B, C = r(batch, n, length), r(batch, n, length)
    elif bc == "grouped":
        B, C = r(batch, groups, n, length), r(batch, groups, n, length)
    else:
        B, C = r(dim, n), r(dim, n)
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length) - 1,
                A=-torch.rand(dim, n, generator=g, dtype=dtype) * 4, B=B, C=C, D=r(dim),
                z=r(batch, dim, length), delta_bias=r(dim))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 1), (1, 4, 16, 2), (2, 5, 3, 17),
                                   (1, 8, 16, 100), (3, 2, 5, 257), (1, 16, 16, 1000)])
@pytest.mark.parametrize("bc", ["var", "grouped", "const"])
def test_forward_and_backward_match_reference(shape, bc):
    batch, dim, n, length = shape
    kw = make(batch, dim, n, length, bc, groups=dim if dim in (1, 2, 4) else 1)
    for v in kw.values():
        v.requires_grad_()
    y, last = selective_scan_fn(**kw, delta_softplus=True, return_last_state=True)
    y_ref, h_ref = reference(**kw, delta_softplus=True)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last.double(), h_ref, rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(kw.values()), gy)
    grads_ref = torch.autograd.grad(y_ref, list(kw.values()), gy.double())
    for name, g, gr in zip(kw, grads, grads_ref, strict=True):
        torch.testing.assert_close(g.double(), gr.double(), rtol=2e-3, atol=2e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_without_optional_inputs_and_dtype_kept():
    kw = make(2, 3, 4, 9, dtype=torch.float64)
    y = selective_scan_fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"])
    y_ref, _ = reference(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"])
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref)
    y16 = selective_scan_fn(kw["u"].bfloat16(), kw["delta"].bfloat16(), kw["A"].float(),
                            kw["B"].bfloat16(), kw["C"].bfloat16())
    assert y16.dtype == torch.bfloat16


def test_gradcheck_small():
    kw = make(1, 2, 3, 11, dtype=torch.float64)
    args = [v.requires_grad_() for v in kw.values()]

    def fn(*a):
        return selective_scan_fn(*a[:7], delta_bias=a[7], delta_softplus=True)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("length", [1, 5, 16, 17, 40])
def test_linear_scan_forward_and_reverse(length):
    T = max(1, int(length**0.5 + 0.999))
    nc = -(-length // T)
    la = -torch.rand(T, 2, nc, 3, dtype=torch.float64) * 3
    b = torch.randn(T, 2, nc, 3, dtype=torch.float64)
    flat = lambda t: t.permute(1, 2, 0, 3).reshape(2, nc * T, 3)  # noqa: E731
    h = flat(_scan_chunked(la, b.clone()))
    hr = flat(_scan_chunked(la, b.clone(), reverse=True))
    a, bb = flat(la).exp(), flat(b)
    s = torch.zeros(2, 3, dtype=torch.float64)
    for i in range(nc * T):
        s = a[:, i] * s + bb[:, i]
        torch.testing.assert_close(h[:, i], s)
    s = torch.zeros(2, 3, dtype=torch.float64)
    for i in reversed(range(nc * T)):
        s = a[:, i] * s + bb[:, i]
        torch.testing.assert_close(hr[:, i], s)


def test_mamba_ssm_backend_needs_cuda():
    kw = make(1, 2, 2, 4)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        selective_scan_fn(**kw, backend="mamba_ssm")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_agrees_with_torch_path():  # pragma: no cover - GPU machines only
    kw = {k: v.cuda() for k, v in make(2, 16, 16, 512).items()}
    y = selective_scan_fn(**kw, delta_softplus=True)
    y_t = selective_scan_fn(**kw, delta_softplus=True, backend="torch")
    torch.testing.assert_close(y, y_t, rtol=1e-3, atol=1e-3)


def test_fused_cpu_kernel_matches_the_chunked_scan(monkeypatch):
    """float32 with input-dependent B, C goes through the C++ kernel; it must agree with the
    chunked PyTorch scan (forced with TOKENUNIFY_FUSED_SCAN=0 semantics) forward and backward."""
    from tokenunify.model import scan

    if scan.fused_cpu_extension() is None:
        pytest.skip("fused CPU scan could not be built here (no compiler); PyTorch path tested")
    kw = make(2, 6, 16, 777)
    for v in kw.values():
        v.requires_grad_()
    y = selective_scan_fn(**kw, delta_softplus=True)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, list(kw.values()), gy)
    monkeypatch.setattr(scan, "fused_cpu_extension", lambda: None)  # as when unavailable
    y2 = selective_scan_fn(**kw, delta_softplus=True)
    g2 = torch.autograd.grad(y2, list(kw.values()), gy)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(kw, g, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
