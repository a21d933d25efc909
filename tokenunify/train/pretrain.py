"""Pretraining stage: TokenUnify (or an ablation) on the tokenized crops of the pretrain datasets.

Outputs in ``out`` (``results/models/{experiment}/pretrain``): ``checkpoint.pt`` (see
:mod:`tokenunify.model.checkpoint`), ``metrics.jsonl`` (one line per logged step: total and
per-task losses, curriculum weights, learning rate, tokens/s) and ``loss.png``.

Determinism and resume: the crops of step s and every random choice of sample i (perturbation,
masks, prefix length, fill noise) are drawn from seeds derived from (seed, s, i) only. So a run
killed after its last checkpoint and restarted continues the same loss curve, and N torchrun
processes, each taking 1/N of the global batch, compute the same gradients as one process.
Work happens in ``{out}.partial`` (checkpoint every ``checkpoint_every`` steps) and is renamed to
``out`` when training finishes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage
from tqdm.auto import tqdm

from tokenunify.io.identity import Lineage, result_settings
from tokenunify.model import checkpoint as ckpt
from tokenunify.model.emmamba import EMmamba, preset
from tokenunify.objectives import OBJECTIVES, CurriculumConfig, ObjectiveConfig, TokenObjective, task_weights
from tokenunify.settings import defaults
from tokenunify.tokenize import TokenCrops
from tokenunify.train import distributed
from tokenunify.train.loop import (
    OptimConfig,
    TrainingRun,
    autocast,
    lr_at,
    param_groups,
    set_threads,
)

log = logging.getLogger(__name__)


_DEFAULTS = defaults("pretrain")


@dataclass(frozen=True)
class PretrainConfig(OptimConfig):
    """Pretraining settings (schema section ``pretrain``)."""

    model: str = _DEFAULTS["model"]
    perturb_p: float = _DEFAULTS["perturb_p"]
    perturb: tuple[str, ...] = _DEFAULTS["perturb"]
    dataset_weights: dict | None = _DEFAULTS["dataset_weights"]
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


class CropSampler:
    """Deterministic global batches over several token stores (weighted across datasets)."""

    def __init__(self, paths: list[str | Path], weights: dict | None, seed: int):
        if not paths:
            raise ValueError("pretraining needs at least one dataset with role 'pretrain'")
        self.stores = [TokenCrops(p) for p in paths]
        self.names = [Path(p).name.removesuffix(".zarr") for p in paths]
        crops = {tuple(s.root.attrs["crop"]) for s in self.stores}
        patches = {tuple(s.patch) for s in self.stores}
        if len(crops) != 1 or len(patches) != 1:
            raise ValueError(f"token stores disagree on crop/patch sizes: {crops}, {patches}")
        self.crop, self.patch = crops.pop(), patches.pop()
        w = np.array([(weights or {}).get(n, len(s)) for n, s in zip(self.names, self.stores,
                                                                         strict=True)], float)
        self.p = w / w.sum()
        self.seed = seed

    def batch(self, step: int, size: int) -> tuple[np.ndarray, list[int]]:
        """(crops (size, 1, Z, Y, X) float32, per-sample seeds) of the global batch at step."""
        rng = np.random.default_rng([self.seed, step])
        which = rng.choice(len(self.stores), size=size, p=self.p)
        xs = []
        for d in which:
            store = self.stores[d]
            xs.append(store.crop(int(rng.integers(len(store))))[None])
        seeds = [self.seed * 1_000_003 + step * size + i for i in range(size)]
        return np.stack(xs), seeds


def perturb(x: np.ndarray, seed: int, cfg: PretrainConfig) -> np.ndarray:
    """With probability perturb_p, one of noise / blur / cutout on one crop (1, Z, Y, X)."""
    rng = np.random.default_rng([seed, 7])
    if not cfg.perturb or rng.random() >= cfg.perturb_p:
        return x
    kind = cfg.perturb[int(rng.integers(len(cfg.perturb)))]
    x = x.copy()
    if kind == "noise":
        x += rng.normal(0, rng.uniform(0.05, 0.3), x.shape).astype(np.float32)
    elif kind == "blur":
        x[0] = ndimage.gaussian_filter(x[0], (0, *(rng.uniform(0.5, 1.5),) * 2))
    elif kind == "cutout":
        sz = [int(n * rng.uniform(0.1, 0.3)) or 1 for n in x.shape[1:]]
        st = [int(rng.integers(0, n - s + 1)) for n, s in zip(x.shape[1:], sz, strict=True)]
        x[0, st[0]:st[0] + sz[0], st[1]:st[1] + sz[1], st[2]:st[2] + sz[2]] = 0.0
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return x


def run(token_paths: list[str | Path], out: str | Path, experiment: str, pretraining: str,
        cfg: PretrainConfig, config_snapshot: dict | None = None, progress: bool | None = None,
        stop_after: int | None = None) -> Path | None:
    """Pretrain one experiment; returns the output folder (on rank 0).

    Args:
        token_paths: ``results/tokens/{dataset}.zarr`` of every pretrain dataset.
        out: output folder ``results/models/{experiment}/pretrain``.
        experiment: experiment name (for logs and the checkpoint).
        pretraining: objective name, a key of :data:`tokenunify.objectives.OBJECTIVES`.
        cfg: settings.
        config_snapshot: the pipeline config, stored in the checkpoint.
        stop_after: stop (without finishing) after this step, as a crash would; for tests.

    Setting ``TOKENUNIFY_DUMP_GRADS=path`` saves the (all-reduced, clipped) gradients of the first
    step to ``path``: a diagnostic for comparing runs across process counts.
    """
    dump_grads = os.environ.get("TOKENUNIFY_DUMP_GRADS")
    if pretraining not in OBJECTIVES:
        raise ValueError(f"unknown pretraining {pretraining!r}; known: {sorted(OBJECTIVES)}")
    tasks = OBJECTIVES[pretraining]
    di = distributed.setup()
    if cfg.batch_size % di.world:
        raise ValueError(f"pretrain.batch_size {cfg.batch_size} is not divisible by the "
                         f"{di.world} processes")
    set_threads(di.device, cfg.threads)
    torch.manual_seed(cfg.seed)
    if token_paths:
        sampler = CropSampler(token_paths, cfg.dataset_weights, cfg.seed)
        crop, patch = sampler.crop, sampler.patch
    elif tasks:
        raise ValueError(f"experiment {experiment!r}: pretraining {pretraining!r} needs token "
                         f"stores (give a dataset the role 'pretrain')")
    else:  # 'none' trains nothing: the (unused) heads take the tokenize defaults' shapes
        sampler, tok = None, defaults("tokenize")
        crop, patch = tuple(tok["crop"]), tuple(tok["patch"])
    net = EMmamba(preset(cfg.model, out_channels=1))
    model = TokenObjective(net, crop, patch, cfg.objective, tasks).to(di.device)
    # what changes the weights (not the process count: N processes equal one)
    settings = result_settings(cfg.to_dict())
    lineage = Lineage.of("pretrain", {"cfg": settings, "tasks": tasks},
                         {"tokens": [str(p) for p in token_paths]})
    frame = TrainingRun(out, lineage, di, experiment, "pretraining")
    optim = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_at(s, cfg) / cfg.lr)

    def restore(state: dict) -> None:
        model.load_state_dict({**{f"net.{k}": v for k, v in state["model"].items()},
                               **state.get("heads", {})})
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

    start, _ = frame.resume(restore)  # no last.pt without tasks: nothing is trained
    ddp = model
    if di.world > 1 and tasks:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    use_scaler = di.device.type == "cuda" and cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    local = cfg.batch_size // di.world
    K = model.K
    steps = cfg.steps if tasks else 0

    def save_checkpoint(step: int, final: bool = False) -> None:
        if not di.is_main:
            return
        heads = {k: v for k, v in model.state_dict().items() if not k.startswith("net.")}
        frame.save("checkpoint.pt" if final else "last.pt", {
            "model": net.state_dict(), "heads": heads, "model_config": net.config.to_dict(),
            "optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "step": step,
            "experiment": experiment, "pretraining": pretraining,
            "config": {"pretrain": cfg.to_dict(), "pipeline": config_snapshot or {}},
            "crop": list(crop), "patch": list(patch)})

    # disable=None: a bar on terminals only (not in Snakemake's log files), rank 0 only
    quiet = True if not di.is_main else (None if progress is None else not progress)
    bar = tqdm(range(start, steps), desc=f"pretrain {experiment}", unit="step", disable=quiet)
    for step in bar:
        t0 = time.perf_counter()
        model.train()
        xs, seeds = sampler.batch(step, cfg.batch_size)
        sl = slice(di.rank * local, (di.rank + 1) * local)
        x = np.stack([perturb(xi, s, cfg) for xi, s in zip(xs[sl], seeds[sl], strict=True)])
        x = torch.from_numpy(x).to(di.device)
        w = task_weights(step / max(1, steps - 1), cfg.curriculum, tasks)
        with autocast(di.device, cfg.precision):
            loss, parts = ddp(x, seeds[sl], w)
        optim.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optim)
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad))
        if dump_grads and step == start and di.is_main:  # diagnostic: gradients after all-reduce
            ckpt.save({n: p.grad.detach().clone() for n, p in model.named_parameters()
                       if p.grad is not None}, dump_grads)
        scaler.step(optim)
        scaler.update()
        sched.step()
        dt = time.perf_counter() - t0
        if di.world > 1:
            t = torch.tensor([float(loss.detach())] + [parts[k] for k in tasks], device=di.device)
            torch.distributed.all_reduce(t)
            t /= di.world
            loss_v, parts = float(t[0]), {k: float(v) for k, v in zip(tasks, t[1:], strict=True)}
        else:
            loss_v = float(loss.detach())
        if di.is_main and (step % cfg.log_every == 0 or step == steps - 1):
            frame.log({"step": step, "loss": loss_v, **{f"loss_{k}": v for k, v in parts.items()},
                       **{f"w_{k}": v for k, v in w.items()}, "lr": sched.get_last_lr()[0],
                       "grad_norm": grad_norm, "tokens_per_s": cfg.batch_size * K / dt})
            bar.set_postfix(loss=f"{loss_v:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step == steps - 1:
            save_checkpoint(step)
        if stop_after is not None and step >= stop_after:
            distributed.teardown()
            return None
    save_checkpoint(max(steps - 1, 0), final=True)
    return frame.finish(f"pretraining: {experiment} ({pretraining})")


__all__ = ["PretrainConfig", "run", "lr_at", "param_groups", "CropSampler"]
