"""Fine-tuning stage: pretrained EMmamba -> 3-channel affinity predictor.

Inputs: the experiment's pretraining checkpoint, and the downloaded volumes of the datasets with
roles ``train`` (sampled) and ``validate`` (scored). Outputs in ``out``
(``results/models/{experiment}/finetune``): ``checkpoint.pt`` (the best validation
checkpoint, or the last one without validation data), ``metrics.jsonl`` (loss per step,
validation VOI / ARAND), ``loss.png`` and ``load_report.json`` (which pretrained tensors were
loaded, dropped for a shape mismatch, e.g. the 1-channel output conv, or missing).
The checkpoint is read like ``import-weights`` reads one (DDP's ``module.`` prefix stripped);
when less than ``min_loaded`` of the network's tensors but the output head load (default: all
of them), fine-tuning stops with an error instead of training from a random initialisation.

Targets: nearest-neighbour affinities (plus optional long-range offsets) from the labels,
:mod:`tokenunify.affinities` convention; optionally widened label borders. Ground-truth 0 never
connects, and the first plane of each channel (no neighbour inside the crop) has weight 0.
Loss: class-balanced weighted MSE, sum(w * (p - t)^2) / (batch * voxels), as the official code.
Inputs are standardised per crop like pretraining and inference
(:func:`tokenunify.model.inputs.normalize_windows`).

Sampling and augmentation are seeded by (seed, step, sample) as in pretraining, so resume and
DDP behave the same way.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import zarr
from tqdm.auto import tqdm

from tokenunify import affinities
from tokenunify.agglomerate.scoring import DEFAULT as DEFAULT_SCORING
from tokenunify.io.identity import Lineage, result_settings
from tokenunify.io.zarrio import require_complete
from tokenunify.model import checkpoint as ckpt
from tokenunify.model.emmamba import EMmamba, ModelConfig
from tokenunify.model.inputs import normalize_windows
from tokenunify.model.loading import LoadReport, load_matching, read_checkpoint
from tokenunify.settings import defaults
from tokenunify.train import distributed
from tokenunify.train.augment import AugmentConfig, augment
from tokenunify.train.loop import (
    OptimConfig,
    TrainingRun,
    autocast,
    lr_at,
    param_groups,
    set_threads,
)

log = logging.getLogger(__name__)
HEAD = "out."  # EMmamba.out: the output conv, whose channels differ from pretraining
PARTS = {"all": ("",), "mamba": (".mamba.",), "encoder": ("vit.", "encoder"),
         "decoder": ("decoder", "out.")}


_DEFAULTS = defaults("finetune")
DEFAULT_FRAGMENTS = defaults("agglomerate")["fragments"]


@dataclass(frozen=True)
class FinetuneConfig(OptimConfig):
    """Fine-tuning settings (schema section ``finetune``); sizes in voxels (z, y, x)."""

    crop: tuple[int, int, int] = _DEFAULTS["crop"]
    widen_border: bool = _DEFAULTS["widen_border"]
    long_range: tuple[tuple[int, int, int], ...] = _DEFAULTS["long_range"]
    part: str = _DEFAULTS["part"]  # all | mamba | encoder | decoder
    validate_every: int = _DEFAULTS["validate_every"]
    thresholds: tuple[float, ...] = _DEFAULTS["thresholds"]
    # the waterz scoring function of validation: the agglomerate stage's (``agglomerate.scoring``,
    # set by the CLI), so the checkpoint is chosen with the merge the segmentation will use
    scoring: str = DEFAULT_SCORING
    # and its fragments (``agglomerate.fragments``, set by the CLI), whole volume
    fragments: str = DEFAULT_FRAGMENTS
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # share of the pretrained tensors (all but the head) that must load
    min_loaded: float = _DEFAULTS["min_loaded"]

    def __post_init__(self):
        from tokenunify.agglomerate.scoring import parse

        # single values are checked by the schema (tokenunify.settings.from_section)
        parse(self.scoring)  # a bad agglomerate.scoring fails now, not at the first validation

    @property
    def offsets(self) -> tuple:
        return affinities.OFFSETS + tuple(self.long_range)


class LabelledSampler:
    """Deterministic random crops (raw uint8, labels uint64) from the train volumes."""

    def __init__(self, volumes: list[str | Path], crop, seed: int):
        if not volumes:
            raise ValueError("fine-tuning needs at least one dataset with role 'train'")
        self.groups = [zarr.open_group(str(v), mode="r") for v in volumes]
        for v, g in zip(volumes, self.groups, strict=True):
            if "labels" not in g:
                raise ValueError(f"{v}: no labels array; train datasets need labels")
            for name in ("raw", "labels"):
                require_complete(g[name], "finetune")
            if any(s < c for s, c in zip(g["raw"].shape, crop, strict=True)):
                raise ValueError(f"{v}: shape {list(g['raw'].shape)} is smaller than "
                                 f"finetune.crop {list(crop)}")
        sizes = np.array([np.prod(g["raw"].shape) for g in self.groups], float)
        self.p = sizes / sizes.sum()
        self.crop, self.seed = tuple(crop), seed

    def batch(self, step: int, size: int):
        rng = np.random.default_rng([self.seed, step])
        out = []
        for i in range(size):
            g = self.groups[int(rng.choice(len(self.groups), p=self.p))]
            start = [int(rng.integers(0, s - c + 1)) for s, c in zip(g["raw"].shape, self.crop,
                                                                   strict=True)]
            box = tuple(slice(a, a + c) for a, c in zip(start, self.crop, strict=True))
            out.append((np.asarray(g["raw"][box]), np.asarray(g["labels"][box]),
                        self.seed * 1_000_003 + step * size + i))
        return out


def make_sample(raw: np.ndarray, labels: np.ndarray, seed: int, cfg: FinetuneConfig):
    """(input (1, Z, Y, X), target (C, Z, Y, X), weight (C, Z, Y, X)) of one crop."""
    rng = np.random.default_rng([seed, 11])
    r, lab = augment(raw.astype(np.float32) / 255.0, labels, rng, cfg.augment)
    if cfg.widen_border:
        lab = affinities.widen_borders(lab)
    aff = affinities.seg_to_affinities(lab, cfg.offsets)
    mask = affinities.affinity_mask(lab.shape, cfg.offsets)
    weight = affinities.class_balanced_weights(aff, mask)
    x = normalize_windows(np.rint(r * 255.0)[None])[0]
    return x[None], aff, weight


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(w (p - t)^2) / (batch * voxels): the official WeightedMSE (channels not averaged)."""
    return (weight * (pred - target) ** 2).sum() / (pred.shape[0] * pred[0, 0].numel())


def set_trainable(model: nn.Module, part: str) -> int:
    """Freeze everything but ``part``; returns the number of trainable parameters."""
    keys = PARTS[part]
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad = any(k in name for k in keys)
        n += p.numel() if p.requires_grad else 0
    return n


def validate(model: EMmamba, volumes: list[str | Path], cfg: FinetuneConfig) -> dict:
    """Whole-volume prediction (the inference path, one block), waterz agglomeration over the
    thresholds with ``cfg.scoring`` from ``cfg.fragments`` (whole volume, not tiled), and VOI /
    ARAND against the labels (best threshold, mean over volumes)."""
    from tokenunify import metrics
    from tokenunify.agglomerate.whole_volume import waterz_segmentations
    from tokenunify.inference import InferConfig, predict_block

    was_training = model.training
    model.eval()
    results = []
    for v in volumes:
        g = zarr.open_group(str(v), mode="r")
        for name in ("raw", "labels"):
            require_complete(g[name], "finetune")
        raw, labels = g["raw"], np.asarray(g["labels"][:])
        win = tuple(min(c, s) if s % 16 == 0 else c for c, s in zip(cfg.crop, raw.shape,
                                                                      strict=True))
        icfg = InferConfig(window=win, overlap=tuple(w // 2 for w in win), batch_size=2)
        core = tuple(slice(0, s) for s in raw.shape)
        aff = predict_block(raw, model, core, icfg)
        best = None
        segs = waterz_segmentations(aff, cfg.thresholds, cfg.scoring, cfg.fragments)
        for t, seg in segs.items():
            s = metrics.evaluate(labels, seg)
            if best is None or s.voi < best[1].voi:
                best = (t, s)
        results.append(best)
    model.train(was_training)
    return {"val_voi": float(np.mean([s.voi for _, s in results])),
            "val_arand": float(np.mean([s.arand for _, s in results])),
            "val_threshold": [t for t, _ in results]}


def check_loaded(report: LoadReport, model: nn.Module, path, min_loaded: float) -> float:
    """The share of ``model``'s tensors outside the output head that ``report`` loaded; a
    :class:`CheckpointError` naming the file and the missing tensors when it is below
    ``min_loaded``. The head (``out.*``, EMmamba's 1x1x1 output conv: 1 channel in pretraining,
    3 or more affinities here) is expected not to load."""
    body = [k for k in model.state_dict() if not k.startswith(HEAD)]
    loaded = set(report.loaded)
    missing = [k for k in body if k not in loaded]
    share = (len(body) - len(missing)) / max(len(body), 1)
    if share < min_loaded:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing) - 5} more)" if len(missing) > 5
                                          else "")
        hint = (f"; {len(report.unexpected)} names of the checkpoint are unknown to the model, "
                f"e.g. {report.unexpected[0]}" if report.unexpected else "")
        raise ckpt.CheckpointError(
            f"{path}: only {share:.1%} of the network's tensors (all but the output head) "
            f"loaded, {len(body) - len(missing)} of {len(body)}; finetune.min_loaded is "
            f"{min_loaded:g}. Missing: {shown}{hint}")
    return share


def run(pretrained: str | Path, train_volumes: list, val_volumes: list, out: str | Path,
        experiment: str, cfg: FinetuneConfig, progress: bool | None = None,
        stop_after: int | None = None) -> Path | None:
    """Fine-tune one experiment's pretrained network; returns the output folder (rank 0).

    ``stop_after`` stops (without finishing) after that step, as a crash would; for tests."""
    di = distributed.setup()
    if cfg.batch_size % di.world:
        raise ValueError(f"finetune.batch_size {cfg.batch_size} is not divisible by {di.world}")
    set_threads(di.device, cfg.threads)
    torch.manual_seed(cfg.seed)
    # the reader of import-weights: DDP's "module." prefix stripped
    state, weights = read_checkpoint(pretrained)
    if "model_config" not in state:
        raise ckpt.CheckpointError(f"{pretrained}: no model_config (an official checkpoint? "
                                   "convert it with `tokenunify import-weights` first)")
    mcfg = ModelConfig.from_dict({**state["model_config"], "out_channels": len(cfg.offsets)})
    net = EMmamba(mcfg)
    report = load_matching(net, weights)
    log.info("%s: initialised from %s\n%s", experiment, pretrained, report.summary())
    share = check_loaded(report, net, pretrained, cfg.min_loaded)
    n_train = set_trainable(net, cfg.part)
    net = net.to(di.device)
    sampler = LabelledSampler(train_volumes, cfg.crop, cfg.seed)
    for v in val_volumes:  # now, not at the first validation
        vg = zarr.open_group(str(v), mode="r")
        for name in ("raw", "labels"):
            require_complete(vg[name], "finetune")
    settings = result_settings(cfg.to_dict())
    lineage = Lineage.of("finetune", settings, {
        "pretrained": pretrained, "train": [str(v) for v in train_volumes],
        "validate": [str(v) for v in val_volumes]})
    frame = TrainingRun(out, lineage, di, experiment, "fine-tuning")
    if di.is_main:
        (frame.path / "load_report.json").write_text(json.dumps(
            {**report.as_dict(), "loaded_share": share, "trainable_parameters": n_train,
             "part": cfg.part}, indent=1))
    optim = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_at(s, cfg) / cfg.lr)

    def restore(state: dict) -> None:
        net.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    start, resumed = frame.resume(restore)
    best_voi = float(resumed.get("best_voi", math.inf))
    ddp = nn.parallel.DistributedDataParallel(net) if di.world > 1 else net
    local = cfg.batch_size // di.world

    def save(name: str, step: int, extra: dict | None = None) -> None:
        frame.save(name, {"model": net.state_dict(), "model_config": mcfg.to_dict(),
                          "optimizer": optim.state_dict(), "scheduler": sched.state_dict(),
                          "step": step, "experiment": experiment, "best_voi": best_voi,
                          "config": {"finetune": cfg.to_dict()},
                          "offsets": [list(o) for o in cfg.offsets], **(extra or {})})

    quiet = True if not di.is_main else (None if progress is None else not progress)
    for step in tqdm(range(start, cfg.steps), desc=f"finetune {experiment}", unit="step",
                     disable=quiet):
        items = sampler.batch(step, cfg.batch_size)[di.rank * local:(di.rank + 1) * local]
        xs, ts, ws = zip(*(make_sample(r, lab, s, cfg) for r, lab, s in items), strict=True)
        x, t, w = (torch.from_numpy(np.stack(a)).to(di.device) for a in (xs, ts, ws))
        net.train()
        with autocast(di.device, cfg.precision):
            pred = torch.sigmoid(ddp(x).float())
        loss = weighted_mse(pred, t, w)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg.clip_grad)
        optim.step()
        sched.step()
        rec = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]}
        final = step == cfg.steps - 1
        if val_volumes and di.is_main and ((step + 1) % cfg.validate_every == 0 or final):
            rec.update(validate(net, val_volumes, cfg))
            if rec["val_voi"] < best_voi:
                best_voi = rec["val_voi"]
                save("checkpoint.pt", step, {"val": rec})
        if di.is_main and (step % cfg.log_every == 0 or final or "val_voi" in rec):
            frame.log(rec)
        if (step + 1) % cfg.checkpoint_every == 0 or final:
            save("last.pt", step)
        if stop_after is not None and step >= stop_after:
            distributed.teardown()
            return None
    if di.is_main and (not val_volumes or not (frame.path / "checkpoint.pt").exists()):
        save("checkpoint.pt", max(cfg.steps - 1, 0))
    return frame.finish(f"fine-tuning: {experiment}")
