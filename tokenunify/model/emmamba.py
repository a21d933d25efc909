"""EMmamba: the convolution + Mamba U-Net of TokenUnify (a SegMamba variant), with presets.

Layout and state-dict names follow the official code (github.com/ydchen0806/TokenUnify, a SegMamba
variant), so its checkpoints
load: ``vit.*`` (the Mamba encoder), ``encoder1..5``, ``decoder5..1`` and ``out`` (MONAI UNETR
blocks, re-implemented here with MONAI's module names so MONAI is not a dependency).

Shapes for an input (B, 1, Z, Y, X)::

    stem  conv (1,7,7) stride 2        -> C0 @ Z/2,  Y/2,  X/2
    down  IN + conv (1,2,2) stride 2   -> C1 @ Z/4 ...  C2 @ Z/8 ...  C3 @ Z/16 ...
    each stage: GSC block, depth x (LayerNorm -> MambaV3), skip = MLP(IN(stage output))
    decoder: UNETR up-blocks back to full resolution, 1x1x1 conv to out_channels

Z, Y and X must each be divisible by 16 (the default 16 x 160 x 160 crop gives feature maps
8x80x80, 4x40x40, 2x20x20, 1x10x10). The official model hard-wires 5-way slice interleaving,
kept at 5 because weights depend on it; the crop size is not hard-wired here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenunify.model.mamba import MambaV3


@dataclass(frozen=True)
class ModelConfig:
    """EMmamba hyper-parameters (channels per stage, bottleneck width, depth, kernel)."""

    feat_size: tuple[int, int, int, int] = (32, 64, 128, 256)
    hidden_size: int = 512
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    kernel_size: tuple[int, int, int] = (1, 5, 5)
    in_channels: int = 1
    out_channels: int = 1
    d_state: int = 16
    nslices: int = 5
    backend: str = "auto"  # selective scan: auto | torch | mamba_ssm
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        for k in ("feat_size", "depths", "kernel_size"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


PRESETS: dict[str, dict] = {
    # name: (feat_size, hidden) with depth 2 per stage and kernel (1,5,5), as in models_mamba.py
    "tiny": {"feat_size": (8, 16, 32, 64), "hidden_size": 64, "depths": (1, 1, 1, 1)},
    "base": {"feat_size": (32, 64, 128, 256), "hidden_size": 512},
    "100M": {"feat_size": (64, 128, 256, 512), "hidden_size": 1024},
    "200M": {"feat_size": (96, 192, 384, 768), "hidden_size": 1024},
    "500M": {"feat_size": (144, 288, 576, 1104), "hidden_size": 2048},
    "1B": {"feat_size": (192, 384, 768, 1536), "hidden_size": 3072},
}


def preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset (tiny, base, 100M, 200M, 500M, 1B)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- MONAI-style blocks


def _pad(kernel, stride=1):
    return tuple((k - stride + 1) // 2 for k in kernel)


class Convolution(nn.Module):
    """Named like MONAI's ``Convolution(conv_only=True)``: the layer sits at ``.conv``."""

    def __init__(self, cin, cout, kernel, stride=1, bias=False, transposed=False):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        if transposed:
            self.conv = nn.ConvTranspose3d(cin, cout, kernel, stride=stride, bias=bias)
        else:
            self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=_pad(kernel, stride),
                                  bias=bias)

    def forward(self, x):
        return self.conv(x)


class UnetResBlock(nn.Module):
    """conv-IN-LReLU-conv-IN plus a 1x1x1 projection when channels change (MONAI)."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.conv1 = Convolution(cin, cout, kernel)
        self.conv2 = Convolution(cout, cout, kernel)
        self.norm1 = nn.InstanceNorm3d(cout)
        self.norm2 = nn.InstanceNorm3d(cout)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.downsample = cin != cout
        if self.downsample:
            self.conv3 = Convolution(cin, cout, 1)
            self.norm3 = nn.InstanceNorm3d(cout)

    def forward(self, x):
        res = x
        out = self.lrelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.downsample:
            res = self.norm3(self.conv3(res))
        return self.lrelu(out + res)


class UnetrBasicBlock(nn.Module):
    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.layer = UnetResBlock(cin, cout, kernel)

    def forward(self, x):
        return self.layer(x)


class UnetrUpBlock(nn.Module):
    """Transposed conv x2, concatenate the skip, residual block (MONAI UnetrUpBlock)."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.transp_conv = Convolution(cin, cout, 2, stride=2, transposed=True)
        self.conv_block = UnetResBlock(2 * cout, cout, kernel)

    def forward(self, x, skip):
        return self.conv_block(torch.cat([self.transp_conv(x), skip], dim=1))


class UnetOutBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = Convolution(cin, cout, 1, bias=True)

    def forward(self, x):
        return self.conv(x)


# ----------------------------------------------------------------------------- Mamba encoder


class GSC(nn.Module):
    """Gated spatial convolution block (SegMamba), residual."""

    def __init__(self, c):
        super().__init__()
        self.proj, self.norm = nn.Conv3d(c, c, 3, 1, 1), nn.InstanceNorm3d(c)
        self.proj2, self.norm2 = nn.Conv3d(c, c, 3, 1, 1), nn.InstanceNorm3d(c)
        self.proj3, self.norm3 = nn.Conv3d(c, c, 1, 1, 0), nn.InstanceNorm3d(c)
        self.proj4, self.norm4 = nn.Conv3d(c, c, 1, 1, 0), nn.InstanceNorm3d(c)

    def forward(self, x):
        x1 = F.relu(self.norm(self.proj(x)))
        x1 = F.relu(self.norm2(self.proj2(x1)))
        x2 = F.relu(self.norm3(self.proj3(x)))
        return F.relu(self.norm4(self.proj4(x1 + x2))) + x


class MambaLayer(nn.Module):
    """Flatten (B, C, Z, Y, X) in z-y-x order, LayerNorm, MambaV3, reshape (no residual)."""

    def __init__(self, dim, d_state=16, nslices=5, backend="auto"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = MambaV3(dim, d_state=d_state, d_conv=4, expand=2, nslices=nslices,
                             backend=backend)

    def forward(self, x):
        B, C = x.shape[:2]
        spatial = x.shape[2:]
        seq = x.reshape(B, C, -1).transpose(1, 2)
        out = self.mamba(self.norm(seq))
        return out.transpose(1, 2).reshape(B, C, *spatial).contiguous()


class MlpChannel(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv3d(c, hidden, 1), nn.GELU(), nn.Conv3d(hidden, c, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MambaEncoder(nn.Module):
    """Anisotropic stem/downsampling + 4 stages of GSC and Mamba layers; returns 4 skips."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dims = cfg.feat_size
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv3d(cfg.in_channels, dims[0], (1, 7, 7), stride=2, padding=(0, 3, 3)))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.InstanceNorm3d(dims[i]), nn.Conv3d(dims[i], dims[i + 1], (1, 2, 2), stride=2)))
        self.gscs = nn.ModuleList([GSC(d) for d in dims])
        self.stages = nn.ModuleList([
            nn.Sequential(*[MambaLayer(d, cfg.d_state, cfg.nslices, cfg.backend)
                            for _ in range(depth)])
            for d, depth in zip(dims, cfg.depths, strict=True)])
        self.norms = nn.ModuleList([nn.InstanceNorm3d(d) for d in dims])
        self.mlps = nn.ModuleList([MlpChannel(d, 2 * d) for d in dims])

    def forward(self, x):
        outs = []
        for i in range(4):
            x = self.stages[i](self.gscs[i](self.downsample_layers[i](x)))
            outs.append(self.mlps[i](self.norms[i](x)))
        return outs


class EMmamba(nn.Module):
    """The U-Net. ``forward(x)`` returns logits (B, out_channels, Z, Y, X); ``features(x)``
    also returns the bottleneck (B, hidden, Z/16, Y/16, X/16) for the pretraining heads."""

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = cfg
        f, k, h = cfg.feat_size, cfg.kernel_size, cfg.hidden_size
        self.vit = MambaEncoder(cfg)
        self.encoder1 = UnetrBasicBlock(cfg.in_channels, f[0], k)
        self.encoder2 = UnetrBasicBlock(f[0], f[1], k)
        self.encoder3 = UnetrBasicBlock(f[1], f[2], k)
        self.encoder4 = UnetrBasicBlock(f[2], f[3], k)
        self.encoder5 = UnetrBasicBlock(f[3], h, k)
        self.decoder5 = UnetrUpBlock(h, f[3], k)
        self.decoder4 = UnetrUpBlock(f[3], f[2], k)
        self.decoder3 = UnetrUpBlock(f[2], f[1], k)
        self.decoder2 = UnetrUpBlock(f[1], f[0], k)
        self.decoder1 = UnetrBasicBlock(f[0], f[0], k)
        self.out = UnetOutBlock(f[0], cfg.out_channels)

    def check_shape(self, x: torch.Tensor) -> None:
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"EMmamba needs Z, Y, X divisible by 16; got {tuple(x.shape[2:])}")

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, out, Z, Y, X), bottleneck (B, hidden, Z/16, Y/16, X/16))."""
        self.check_shape(x)
        outs = self.vit(x)
        enc1 = self.encoder1(x)
        enc2, enc3, enc4 = self.encoder2(outs[0]), self.encoder3(outs[1]), self.encoder4(outs[2])
        hidden = self.encoder5(outs[3])
        d = self.decoder5(hidden, enc4)
        d = self.decoder4(d, enc3)
        d = self.decoder3(d, enc2)
        d = self.decoder2(d, enc1)
        return self.out(self.decoder1(d)), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]


def count_parameters(cfg: ModelConfig) -> int:
    """Number of parameters of a config, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = EMmamba(cfg)
    return sum(p.numel() for p in model.parameters())
