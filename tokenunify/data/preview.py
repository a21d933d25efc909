"""A PNG montage of synthetic sections beside real EM sections, for a by-eye check.

``tokenunify preview --out preview.png [--real DATA]`` renders a few sections of the
embedded generator (raw, and labels as random grey levels) and, when the real volumes are
present, NeuroProof FIB-SEM and ISBI 2012 TEM sections at the same scale.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tokenunify.data.synthetic import SyntheticConfig, SyntheticEM

log = logging.getLogger(__name__)


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size), np.uint8)
    h, w = min(size, img.shape[0]), min(size, img.shape[1])
    out[:h, :w] = img[:h, :w]
    return out


def montage(real: Path | None = None, size: int = 256, seed: int = 1) -> np.ndarray:
    """Top row: synthetic sections 0, 4, 8 and their labels; bottom row: real sections."""
    gen = SyntheticEM(SyntheticConfig(shape=(12, size, size), seed=seed))
    box = lambda z: (slice(z, z + 1), slice(0, size), slice(0, size))  # noqa: E731
    top = [gen.read("raw", box(z))[0] for z in (0, 4, 8)]
    lab = gen.read("labels", box(0))[0]
    top.append(((lab * np.uint64(2654435761)) % np.uint64(200) + np.uint64(40)).astype(np.uint8))
    rows = [np.concatenate(top, 1)]
    if real is not None:
        import imageio.v3 as iio

        files = sorted((real / "neuroproof_fib_medulla_250" / "grayscale_maps").glob("*.png"))
        isbi = sorted((real / "isbi2012_membrane_2d" / "image").glob("*.png"))
        imgs = [iio.imread(f) for f in files[::100][:2] + isbi[:2]]
        if imgs:
            rows.append(np.concatenate([_fit(i, size) for i in imgs] +
                                       [np.zeros((size, size), np.uint8)] * (4 - len(imgs)), 1))
    return np.concatenate(rows, 0)


def save_preview(out: str | Path, real: str | Path | None = None, size: int = 256) -> Path:
    """Write the montage PNG; ``real`` is the folder holding the real datasets, if any."""
    import imageio.v3 as iio

    real_path = Path(real) if real and Path(real).exists() else None
    if real and real_path is None:
        log.warning("real data folder %s not found; showing synthetic sections only", real)
    out = Path(out)
    iio.imwrite(out, montage(real_path, size))
    log.info("wrote %s", out)
    return out
