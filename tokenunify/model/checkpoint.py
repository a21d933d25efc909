"""Checkpoints: plain dicts of tensors and JSON-able values, saved atomically, loaded safely.

Layout: ``{model: state_dict, model_config: dict, optimizer, scheduler, step, config, rng,
heads, metrics}``. Loading always uses ``torch.load(..., weights_only=True)``: a file that
carries pickled objects is refused with an error naming it.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded safely or has the wrong layout."""


def save(obj: dict, path: str | Path) -> Path:
    """torch.save to a temporary name in the same folder, then rename (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str | Path, map_location="cpu") -> dict:
    """Load with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; the legacy format is a pickle (protocol byte 0x80 first)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a torch checkpoint: neither a zip archive nor a "
                              f"pickle (it starts with {head!r}; an incomplete download or "
                              "another kind of file?)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln]
        if not reason:  # a pickle the safe unpickler cannot parse, not a refused class
            raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt pickle: "
                                  f"{_unpickler_error(exc)})") from exc
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled Python objects, which weights_only=True "
            f"does not execute ({reason[0].split(' was not')[0]}). Re-save it as plain tensors and "
            "dicts.") from exc
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _unpickler_error(exc: Exception) -> str:
    """The WeightsUnpickler's own reason in torch's long weights_only message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[-1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else ln)
    return lines[0] if lines else type(exc).__name__


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors / plain values."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].copy()),
            "numpy_pos": int(np_state[2]), "python": torch.tensor(
                random.getstate()[1], dtype=torch.int64)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
