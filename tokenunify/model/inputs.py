"""What the network sees: raw uint8 windows standardised one by one.

Pretraining (tokenize's default ``per_crop``), fine-tuning and inference all feed EMmamba
windows standardised by their own mean and std, so the encoder sees at every stage inputs like
the ones it was pretrained on.
"""

from __future__ import annotations

import numpy as np


def normalize_windows(batch: np.ndarray) -> np.ndarray:
    """uint8 windows (n, Z, Y, X) -> float32, each standardised by its own mean and std.

    The same per-crop normalisation as pretraining (tokenize's default), so fine-tuning and
    inference see inputs like the ones the encoder was pretrained on. It depends only on the
    window, so it does not break block-size invariance."""
    x = batch.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / np.maximum(std, 1.0)
