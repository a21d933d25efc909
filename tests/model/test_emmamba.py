"""EMmamba presets, official parameter names, the three-scan block, official weight import."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from tokenunify.model.emmamba import EMmamba, count_parameters, preset
from tokenunify.model.mamba import MambaV3
from tokenunify.model.scan import selective_scan_fn

OFFICIAL_M = {"base": 28.30, "100M": 112.53, "200M": 206.58, "500M": 506.57, "1B": 1008.91}


@pytest.mark.parametrize("name", sorted(OFFICIAL_M))
def test_preset_parameter_counts_match_official(name):
    n = count_parameters(preset(name)) / 1e6
    assert abs(n - OFFICIAL_M[name]) / OFFICIAL_M[name] < 0.005, n


def test_state_dict_names_are_the_official_ones():
    keys = set(EMmamba(preset("tiny")).state_dict())
    for k in ["vit.downsample_layers.0.0.weight", "vit.downsample_layers.3.1.bias",
              "vit.gscs.2.proj4.weight", "vit.stages.0.0.norm.weight", "vit.mlps.1.fc2.bias",
              "encoder1.layer.conv3.conv.weight", "encoder5.layer.conv1.conv.weight",
              "decoder5.transp_conv.conv.weight", "decoder2.conv_block.conv3.conv.weight",
              "decoder1.layer.conv2.conv.weight", "out.conv.conv.weight", "out.conv.conv.bias"]:
        assert k in keys, k
    mamba = {k.split("mamba.")[1] for k in keys if k.startswith("vit.stages.0.0.mamba.")}
    assert mamba == {"in_proj.weight", "out_proj.weight", "A_log", "A_b_log", "A_s_log", "D",
                     "D_b", "D_s"} | {f"{p}{s}.{w}" for s in ("", "_b", "_s")
                                      for p, w in [("conv1d", "weight"), ("conv1d", "bias"),
                                                   ("x_proj", "weight"), ("dt_proj", "weight"),
                                                   ("dt_proj", "bias")]}


def test_mamba_shapes_and_upstream_init():
    m = MambaV3(32)
    E, R = 64, 2
    assert m.in_proj.weight.shape == (2 * E, 32) and m.in_proj.bias is None
    assert m.conv1d_s.weight.shape == (E, 1, 4) and m.x_proj_b.weight.shape == (R + 32, E)
    assert m.dt_proj.weight.shape == (E, R) and m.A_s_log.shape == (E, 16)
    torch.testing.assert_close(m.A_b_log[3], torch.log(torch.arange(1, 17.0)))
    assert (m.D_s == 1).all()
    dt = F.softplus(m.dt_proj_b.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


def _branch_ref(m, x, z, sfx):
    L = x.shape[-1]
    xc = F.silu(getattr(m, f"conv1d{sfx}")(x)[..., :L])
    dbl = getattr(m, f"x_proj{sfx}")(xc.transpose(1, 2))
    dt, B, C = dbl.split([m.dt_rank, 16, 16], -1)
    delta = getattr(m, f"dt_proj{sfx}").weight @ dt.transpose(1, 2)
    A = -torch.exp(getattr(m, "A_log" if not sfx else f"A{sfx}_log"))
    return selective_scan_fn(xc, delta, A, B.transpose(1, 2), C.transpose(1, 2),
                             getattr(m, f"D{sfx}"), z, getattr(m, f"dt_proj{sfx}").bias, True)


def test_three_scans_follow_the_official_orderings():
    torch.manual_seed(0)
    m = MambaV3(8)
    h = torch.randn(2, 20, 8)
    x, z = m.in_proj(h).transpose(1, 2).chunk(2, 1)
    f = _branch_ref(m, x, z, "")
    b = _branch_ref(m, x.flip(-1), z.flip(-1), "_b").flip(-1)
    # slice: 5 contiguous pieces interleaved: position p of piece c -> p * 5 + c
    perm = torch.tensor([c * 4 + p for p in range(4) for c in range(5)])
    inv = torch.argsort(perm)
    s = _branch_ref(m, x[..., perm], z[..., perm], "_s")[..., inv]
    torch.testing.assert_close(m(h), m.out_proj((f + b + s).transpose(1, 2)))


def test_shapes_and_divisibility():
    net = EMmamba(preset("tiny"))
    y, hidden = net.features(torch.randn(1, 1, 16, 32, 48))
    assert y.shape == (1, 1, 16, 32, 48) and hidden.shape == (1, 64, 1, 2, 3)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 1, 18, 32, 32))


def test_import_official_weights(tmp_path):
    """A checkpoint in the official layout: {'model': ...} with 'module.' prefixes, a pickled
    argparse.Namespace, a 'preciever' head and a 1-channel output conv."""
    from tokenunify.model.checkpoint import CheckpointError
    from tokenunify.model.loading import import_official, read_state_dict

    torch.manual_seed(1)
    theirs = EMmamba(preset("tiny"))
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}
    state["module.preciever.fc.weight"] = torch.zeros(3, 3)
    src = tmp_path / "official.pth"
    torch.save({"model": state, "epoch": 370, "args": argparse.Namespace(lr=1e-3)}, src)
    rep = import_official(src, tmp_path / "ours.pt", preset("tiny", out_channels=3))
    assert [d[0] for d in rep.dropped] == ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert rep.unexpected == ["preciever.fc.weight"]
    assert rep.missing == ["out.conv.conv.weight", "out.conv.conv.bias"]
    ours = read_state_dict(tmp_path / "ours.pt")
    torch.testing.assert_close(ours["vit.stages.1.0.mamba.A_s_log"],
                               theirs.state_dict()["vit.stages.1.0.mamba.A_s_log"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": state, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        read_state_dict(tmp_path / "evil.pth")
