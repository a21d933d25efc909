"""Pretraining heads: the Perceiver Resampler used by next-all-token prediction.

:class:`PerceiverResampler` (as in Flamingo): a fixed set of learned latent vectors cross-attends
to the encoder's bottleneck features (and self-attends), ``layers`` times, so the cost does not
grow with the number of feature positions. :class:`TokenDecoder` then lets one learned query per
token position read the latents and predicts that token's voxels. The official code has no such
head (its next-all task predicts tokens through a plain linear layer); this follows the
paper's description.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _CrossBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kvn = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kvn, kvn, need_weights=False)[0]
        return q + self.ff(self.norm_ff(q))


class PerceiverResampler(nn.Module):
    """(B, M, feat_dim) features -> (B, latents, dim) latent summary."""

    def __init__(self, feat_dim: int, dim: int = 128, latents: int = 16, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.proj = nn.Linear(feat_dim, dim)
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.blocks = nn.ModuleList([_CrossBlock(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats)
        lat = self.latents.expand(x.shape[0], -1, -1)
        for blk in self.blocks:
            lat = blk(lat, torch.cat([x, lat], dim=1))  # attend to features and latents
        return self.norm(lat)


class TokenDecoder(nn.Module):
    """Latents -> voxels of every token position: (B, latents, dim) -> (B, K, patch_voxels)."""

    def __init__(self, n_tokens: int, patch_voxels: int, dim: int = 128, heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.block = _CrossBlock(dim, heads)
        self.head = nn.Linear(dim, patch_voxels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(latents.shape[0], -1, -1)
        return self.head(self.block(q, latents))
