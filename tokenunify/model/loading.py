"""Loading official TokenUnify / SegMamba weights (and our own) into EMmamba, with a report.

Official checkpoints are ``{'model': state_dict, ...}`` whose keys may carry DDP's ``module.``
prefix; their names are those of :mod:`tokenunify.model.emmamba` (as in github.com/ydchen0806/TokenUnify).
Keys are matched by name: equal shapes load, different shapes (e.g. the output conv, 1 channel
in pretraining vs 3 affinities) are dropped and listed, ours without a counterpart stay as
initialised and are listed as missing, theirs without a counterpart (``preciever.*``) are listed
as unexpected.

Loading uses ``torch.load(weights_only=True)``. Official files also pickle the training
``argparse.Namespace``; that one class is allow-listed here (it only carries attributes),
anything else pickled is refused with an error.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenunify.model import checkpoint as ckpt
from tokenunify.model.emmamba import EMmamba, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What happened to each key when loading a state dict."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # name, theirs, ours
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for name, theirs, ours in self.dropped:
            lines.append(f"dropped {name}: shape {theirs} in the checkpoint, {ours} in the model")
        if self.missing:
            lines.append(f"missing (left as initialised): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (ignored): {', '.join(self.unexpected)}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"loaded": len(self.loaded), "dropped": [d[0] for d in self.dropped],
                "missing": self.missing, "unexpected": self.unexpected}


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the whole checkpoint dict, its model state dict with ``module.`` stripped) of an
    official or tokenunify checkpoint."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = ckpt.load(path)
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ckpt.CheckpointError(f"{path}: no state dict of tensors under 'model'")
    return obj, {k.removeprefix("module."): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of an official or tokenunify checkpoint, ``module.`` stripped."""
    return read_checkpoint(path)[1]


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """Load the tensors of ``state`` whose names and shapes match ``model``; report the rest."""
    own = model.state_dict()
    rep = LoadReport()
    keep = {}
    for k, v in state.items():
        if k not in own:
            rep.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            rep.dropped.append((k, list(v.shape), list(own[k].shape)))
        else:
            keep[k] = v
            rep.loaded.append(k)
    rep.missing = [k for k in own if k not in keep]
    model.load_state_dict(keep, strict=False)
    return rep


def import_official(src: str | Path, out: str | Path, cfg: ModelConfig) -> LoadReport:
    """Convert an official checkpoint into ours (``{model, model_config, ...}``) at ``out``."""
    state = read_state_dict(src)
    model = EMmamba(cfg)
    rep = load_matching(model, state)
    if not rep.loaded:
        raise ckpt.CheckpointError(f"{src}: no tensor matches the {cfg.feat_size} EMmamba "
                                   "(wrong preset?)\n" + rep.summary())
    ckpt.save({"model": model.state_dict(), "model_config": cfg.to_dict(), "step": 0,
               "source": str(src), "import_report": rep.as_dict()}, out)
    log.info("imported %s -> %s\n%s", src, out, rep.summary())
    return rep
