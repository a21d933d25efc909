"""Training augmentations for fine-tuning, applied to raw and labels together.

Each transform fires with its own probability (:class:`AugmentConfig`). Geometric transforms
(flips along z/y/x, y<->x transpose, in-plane rotation, elastic deformation, section
misalignment) move raw and labels with the same coordinates: raw is interpolated linearly (order
``raw_order``), labels by nearest neighbour, so they stay aligned. Intensity transforms
(contrast, brightness, gamma) and simulated missing sections touch raw only. Shapes are
(Z, Y, X); raw is float32 in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tokenunify.settings import defaults

_DEFAULTS = defaults("finetune", "augment")


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and strengths; 0 disables a transform."""

    flip: float = _DEFAULTS["flip"]  # each axis flipped and y/x transposed with probability 0.5 when it fires
    rotate: float = _DEFAULTS["rotate"]
    elastic: float = _DEFAULTS["elastic"]
    elastic_alpha: float = _DEFAULTS["elastic_alpha"]  # displacement scale (voxels)
    elastic_sigma: float = _DEFAULTS["elastic_sigma"]  # smoothness of the displacement field (voxels)
    intensity: float = _DEFAULTS["intensity"]
    contrast: float = _DEFAULTS["contrast"]
    brightness: float = _DEFAULTS["brightness"]
    missing_section: float = _DEFAULTS["missing_section"]
    misalign: float = _DEFAULTS["misalign"]
    misalign_max: int = _DEFAULTS["misalign_max"]  # voxels
    raw_order: int = 1  # interpolation order for raw (labels always use 0)


def _flip(raw, lab, rng):
    for ax in range(3):
        if rng.random() < 0.5:
            raw, lab = np.flip(raw, ax), np.flip(lab, ax)
    if rng.random() < 0.5:
        raw, lab = raw.transpose(0, 2, 1), lab.transpose(0, 2, 1)
    return np.ascontiguousarray(raw), np.ascontiguousarray(lab)


def _rotate(raw, lab, rng, order):
    angle = rng.uniform(0, 360)
    kw = {"axes": (1, 2), "reshape": False, "mode": "reflect"}
    return (ndimage.rotate(raw, angle, order=order, **kw),
            ndimage.rotate(lab, angle, order=0, **kw))


def _elastic(raw, lab, rng, cfg):
    _, ny, nx = raw.shape
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (ny, nx)), cfg.elastic_sigma) * cfg.elastic_alpha
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (ny, nx)), cfg.elastic_sigma) * cfg.elastic_alpha
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    coords = [yy + dy, xx + dx]
    warp = lambda a, o: np.stack([ndimage.map_coordinates(s, coords, order=o, mode="reflect")  # noqa: E731
                                  for s in a])
    return warp(raw, cfg.raw_order).astype(raw.dtype), warp(lab, 0).astype(lab.dtype)


def _misalign(raw, lab, rng, cfg):
    z = int(rng.integers(1, raw.shape[0])) if raw.shape[0] > 1 else 0
    shift = (0, *rng.integers(-cfg.misalign_max, cfg.misalign_max + 1, 2))
    raw, lab = raw.copy(), lab.copy()
    raw[z:] = ndimage.shift(raw[z:], shift, order=0, mode="nearest")
    lab[z:] = ndimage.shift(lab[z:], shift, order=0, mode="nearest")
    return raw, lab


def _intensity(raw, rng, cfg):
    raw = raw * (1 + rng.uniform(-cfg.contrast, cfg.contrast))
    raw = raw + rng.uniform(-cfg.brightness, cfg.brightness)
    raw = np.clip(raw, 0, 1) ** (2.0 ** rng.uniform(-1, 1))
    return raw.astype(np.float32)


def augment(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Randomly transformed copies of (raw (Z, Y, X) float32 in [0, 1], labels (Z, Y, X))."""
    if raw.shape != labels.shape:
        raise ValueError(f"raw {raw.shape} and labels {labels.shape} differ")
    if rng.random() < cfg.flip:
        raw, labels = _flip(raw, labels, rng)
    if rng.random() < cfg.rotate:
        raw, labels = _rotate(raw, labels, rng, cfg.raw_order)
    if rng.random() < cfg.elastic:
        raw, labels = _elastic(raw, labels, rng, cfg)
    if rng.random() < cfg.misalign:
        raw, labels = _misalign(raw, labels, rng, cfg)
    if rng.random() < cfg.intensity:
        raw = _intensity(raw, rng, cfg)
    if rng.random() < cfg.missing_section:
        raw = raw.copy()
        raw[int(rng.integers(raw.shape[0]))] = 0.0
    return np.ascontiguousarray(raw, dtype=np.float32), np.ascontiguousarray(labels)
