"""The three token-prediction tasks on top of the EMmamba U-Net.

Shapes: a batch of normalised crops x (B, 1, Z, Y, X); patch (pz, py, px); K = Z/pz * Y/py * X/px
tokens of P = pz*py*px voxels, indexed in z-y-x raster order (as tokenize.patchify).

- random: a fraction ``mask_ratio`` of tokens is replaced (noise or zeros); the U-Net
  reconstructs the input and the loss is the MSE on the masked tokens only.
- next: along the path pi (an axis order, default z-y-x raster), a prefix length k is drawn per
  sample; tokens pi(>=k) are replaced before the network sees anything, and the U-Net output at
  token pi(k) is compared with the true token. Nothing from tokens >= k can leak: they never
  reach the input (InstanceNorm statistics see only the fill, which does not depend on them).
- next_all: from the same prefix input, a Perceiver Resampler reads the bottleneck features and a
  token decoder predicts every token pi(>=k); the loss is their mean MSE.

Targets are the clean tokens, normalised per token (MAE's norm_pix) when ``norm_pix`` is set.
Every random choice (masks, k, fill noise) comes from a per-sample seed, so the same global
batch gives the same losses on 1 or N processes. With per-crop input normalisation (tokenize's
default) the crop's mean and std are two numbers computed over all its voxels; use
``normalize: per_volume`` to exclude even that from the next-token inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tokenunify.model.emmamba import EMmamba
from tokenunify.model.heads import PerceiverResampler, TokenDecoder
from tokenunify.objectives.curriculum import TASKS
from tokenunify.settings import defaults

OBJECTIVES: dict[str, tuple[str, ...]] = {
    "tokenunify": TASKS,
    "mae": ("random",),
    "next": ("next",),
    "random+next": ("random", "next"),
    "random+next_all": ("random", "next_all"),
    "none": (),
}


_DEFAULTS = defaults("pretrain", "objective")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Settings of the token tasks (see the module doc)."""

    mask_ratio: float = _DEFAULTS["mask_ratio"]
    fill: str = _DEFAULTS["fill"]  # noise | zero
    norm_pix: bool = _DEFAULTS["norm_pix"]
    path: str = _DEFAULTS["path"]  # token order for next / next_all: axis order, slowest first
    resampler_latents: int = _DEFAULTS["resampler_latents"]
    resampler_layers: int = _DEFAULTS["resampler_layers"]
    resampler_dim: int = _DEFAULTS["resampler_dim"]
    resampler_heads: int = _DEFAULTS["resampler_heads"]
    # every value is checked by the schema (pretrain.objective; tokenunify.settings)


def patchify(x: torch.Tensor, patch) -> torch.Tensor:
    """(B, 1, Z, Y, X) -> (B, K, P) in z-y-x raster order of tokens."""
    B, _, Z, Y, X = x.shape
    pz, py, px = patch
    t = x.reshape(B, Z // pz, pz, Y // py, py, X // px, px)
    return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, -1, pz * py * px)


def token_to_voxel_mask(mask: torch.Tensor, grid, patch) -> torch.Tensor:
    """(B, K) bool -> (B, 1, Z, Y, X) bool."""
    B = mask.shape[0]
    m = mask.reshape(B, 1, *grid)
    for ax, p in enumerate(patch):
        m = m.repeat_interleave(p, dim=2 + ax)
    return m


def path_order(grid, path: str) -> torch.Tensor:
    """Token indices (z-y-x raster numbering) in the order of ``path`` (slowest axis first)."""
    idx = torch.arange(grid[0] * grid[1] * grid[2]).reshape(*grid)
    perm = ["zyx".index(a) for a in path]
    return idx.permute(*perm).reshape(-1)


class TokenObjective(nn.Module):
    """Owns the U-Net (``net``) and the next-all heads; computes the per-task losses."""

    def __init__(self, net: EMmamba, crop, patch, cfg: ObjectiveConfig = ObjectiveConfig(),
                 tasks: tuple[str, ...] = TASKS):
        super().__init__()
        self.net, self.cfg, self.tasks = net, cfg, tuple(tasks)
        self.crop, self.patch = tuple(crop), tuple(patch)
        for c, p in zip(crop, patch, strict=True):
            if c % p:
                raise ValueError(f"crop {crop} is not a multiple of patch {patch}")
        self.grid = tuple(c // p for c, p in zip(crop, patch, strict=True))
        self.K = self.grid[0] * self.grid[1] * self.grid[2]
        self.P = patch[0] * patch[1] * patch[2]
        self.register_buffer("order", path_order(self.grid, cfg.path), persistent=False)
        if "next_all" in self.tasks:
            self.resampler = PerceiverResampler(net.config.hidden_size, cfg.resampler_dim,
                                                cfg.resampler_latents, cfg.resampler_layers,
                                                cfg.resampler_heads)
            self.token_decoder = TokenDecoder(self.K, self.P, cfg.resampler_dim,
                                              cfg.resampler_heads)

    # ------------------------------------------------------------------ inputs
    def _generators(self, seeds, salt: int):
        return [torch.Generator().manual_seed(int(s) * 4 + salt) for s in seeds]

    def _fill(self, x: torch.Tensor, hide: torch.Tensor, gens) -> torch.Tensor:
        vox = token_to_voxel_mask(hide, self.grid, self.patch)
        if self.cfg.fill == "zero":
            return x.masked_fill(vox, 0.0)
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x)
        return torch.where(vox, noise, x)

    def random_inputs(self, x: torch.Tensor, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, mask (B, K) of replaced tokens)."""
        gens = self._generators(seeds, 1)
        n = max(1, int(round(self.cfg.mask_ratio * self.K)))
        mask = torch.zeros(len(seeds), self.K, dtype=torch.bool)
        for i, g in enumerate(gens):
            mask[i, torch.randperm(self.K, generator=g)[:n]] = True
        mask = mask.to(x.device)
        return self._fill(x, mask, gens), mask

    def prefix_inputs(self, x: torch.Tensor, seeds, k: torch.Tensor | None = None):
        """(prefix input, k (B,), rank (K,)): tokens with path rank >= k are replaced."""
        gens = self._generators(seeds, 2)
        if k is None:
            k = torch.tensor([int(torch.randint(1, self.K, (1,), generator=g)) for g in gens])
        rank = torch.empty(self.K, dtype=torch.long)
        rank[self.order.cpu()] = torch.arange(self.K)
        hide = rank[None, :] >= k[:, None]
        return self._fill(x, hide.to(x.device), gens), k.to(x.device), rank.to(x.device)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        t = patchify(x, self.patch)
        if self.cfg.norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    # ------------------------------------------------------------------ predictions
    def predict_prefix(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(U-Net token predictions (B, K, P), next-all predictions (B, K, P) or None)."""
        logits, hidden = self.net.features(x_in)
        dense = patchify(logits, self.patch)
        if "next_all" not in self.tasks:
            return dense, None
        feats = hidden.flatten(2).transpose(1, 2)
        return dense, self.token_decoder(self.resampler(feats))

    def forward(self, x: torch.Tensor, seeds, weights: dict[str, float]):
        """Weighted total loss and the per-task losses (detached floats)."""
        tgt = self.targets(x)
        losses: dict[str, torch.Tensor] = {}
        if "random" in self.tasks:
            x_in, mask = self.random_inputs(x, seeds)
            pred = patchify(self.net(x_in), self.patch)
            losses["random"] = ((pred - tgt) ** 2).mean(-1)[mask].mean()
        if "next" in self.tasks or "next_all" in self.tasks:
            x_in, k, rank = self.prefix_inputs(x, seeds)
            dense, all_pred = self.predict_prefix(x_in)
            if "next" in self.tasks:
                idx = self.order[k]  # token pi(k) of each sample
                b = torch.arange(x.shape[0], device=x.device)
                losses["next"] = ((dense[b, idx] - tgt[b, idx]) ** 2).mean()
            if "next_all" in self.tasks:
                later = (rank[None, :] >= k[:, None]).float()
                per_token = ((all_pred - tgt) ** 2).mean(-1)
                # mean over each sample's later tokens, then over samples (so that DDP's
                # average over equal per-rank batches equals the global-batch loss)
                losses["next_all"] = ((per_token * later).sum(1) / later.sum(1)).mean()
        total = sum(weights[t] * losses[t] for t in losses)
        return total, {t: float(v.detach()) for t, v in losses.items()}
