"""Training machinery shared by pretraining and fine-tuning.

:class:`OptimConfig` holds the settings both stages have (schedule, AdamW, clipping, logging,
seed, precision, processes, CPU threads); ``set_threads`` fixes torch's CPU thread count,
``lr_at`` is the warm-up + half-cosine schedule, ``param_groups`` the AdamW grouping,
``autocast`` the mixed-precision context, ``truncate_metrics`` / ``plot_losses`` handle
``metrics.jsonl`` and ``loss.png``, and :class:`TrainingRun` is the frame around both stages'
step loops (staging, resume, metrics log, checkpoints, commit).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tokenunify.settings import defaults

log = logging.getLogger(__name__)
# the keys shared by pretrain and finetune have the same defaults (tests/test_settings.py)
_DEFAULTS = defaults("pretrain")


@dataclass(frozen=True)
class OptimConfig:
    """Settings shared by the training stages (see the schema sections pretrain / finetune)."""

    steps: int = _DEFAULTS["steps"]
    batch_size: int = _DEFAULTS["batch_size"]
    lr: float = _DEFAULTS["lr"]
    min_lr: float = _DEFAULTS["min_lr"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    betas: tuple[float, float] = _DEFAULTS["betas"]
    warmup_steps: int = _DEFAULTS["warmup_steps"]
    clip_grad: float = _DEFAULTS["clip_grad"]
    checkpoint_every: int = _DEFAULTS["checkpoint_every"]
    log_every: int = _DEFAULTS["log_every"]
    seed: int = _DEFAULTS["seed"]
    precision: str = _DEFAULTS["precision"]  # auto | fp32 | bf16 | fp16 (bf16/fp16 on CUDA only)
    nproc: int = _DEFAULTS["nproc"]
    # torch CPU threads per process: results depend on it, so it is fixed here
    threads: int = _DEFAULTS["threads"]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def set_threads(device: torch.device, threads: int) -> None:
    """On the CPU, compute with ``threads`` torch threads (torch's default is the machine's core
    count, 1 under torchrun): float sums, and so the weights, then depend on the config only."""
    if device.type == "cpu":
        torch.set_num_threads(threads)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up then half-cosine from lr to min_lr (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, 1-D parameters and Mamba's A_log / D (upstream)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def truncate_metrics(path: Path, start: int) -> None:
    """Drop logged steps >= start (they will be redone after a resume)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < start]
    path.write_text("".join(ln + "\n" for ln in keep))


def plot_losses(metrics: Path, png: Path, title: str) -> None:
    """Loss curves (total and per task) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if lines:
        df = pd.DataFrame(lines)
        for col in [c for c in df.columns if c.startswith("loss")]:
            ax.plot(df["step"], df[col], label=col.removeprefix("loss_") if col != "loss"
                    else "total (weighted)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pretraining (random initialisation)", ha="center")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (normalised pixels)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


class TrainingRun:
    """The frame both training stages share around their step loop.

    Rank 0 owns the staging folder (:class:`~tokenunify.io.zarrio.StagedOutput`, resumed only
    with the same settings and inputs); every rank can read it. :meth:`resume` restores the last
    resume checkpoint (``last.pt``) and cuts ``metrics.jsonl`` back to it, :meth:`log` appends a
    metrics line, :meth:`save` writes a checkpoint with the random state, and :meth:`finish`
    draws ``loss.png``, drops ``last.pt`` and renames the folder into place.

    Args:
        out: the stage's output folder.
        lineage: what the output is made from (its settings digest and inputs).
        di: the process group (:func:`tokenunify.train.distributed.setup`).
        experiment, stage: names for the log lines.
    """

    def __init__(self, out: str | Path, lineage, di, experiment: str, stage: str):
        from tokenunify.io.zarrio import StagedOutput, staging_path
        from tokenunify.train import distributed

        self.di, self.experiment, self.stage = di, experiment, stage
        self.staged = StagedOutput(out, lineage) if di.is_main else None
        distributed.barrier()
        self.path = staging_path(out)
        self.last = self.path / "last.pt"
        self.metrics = self.path / "metrics.jsonl"

    def resume(self, restore) -> tuple[int, dict]:
        """(first step to run, the resume checkpoint or {}): when ``last.pt`` exists,
        ``restore(state)`` loads the model and optimiser from it and the random state is
        restored; the metrics lines of steps to be redone are dropped (rank 0)."""
        from tokenunify.model import checkpoint as ckpt

        start, state = 0, {}
        if self.last.exists():
            state = ckpt.load(self.last)
            restore(state)
            ckpt.set_rng_state(state["rng"])
            start = int(state["step"]) + 1
            log.info("%s: resuming %s at step %d", self.experiment, self.stage, start)
        if self.di.is_main:
            truncate_metrics(self.metrics, start)
        return start, state

    def log(self, record: dict) -> None:
        """Append one line to ``metrics.jsonl`` (rank 0)."""
        if self.di.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, name: str, state: dict) -> None:
        """Write checkpoint ``name`` (e.g. ``last.pt``) of ``state`` and the random state
        (rank 0)."""
        from tokenunify.model import checkpoint as ckpt

        if self.di.is_main:
            ckpt.save({**state, "rng": ckpt.rng_state()}, self.path / name)

    def finish(self, title: str) -> Path | None:
        """End the process group; on rank 0 draw ``loss.png``, drop ``last.pt`` and commit.
        Returns the output folder (rank 0) or None."""
        from tokenunify.train import distributed

        distributed.teardown()
        if not self.di.is_main:
            return None
        self.metrics.touch()
        plot_losses(self.metrics, self.path / "loss.png", title)
        self.last.unlink(missing_ok=True)
        return self.staged.commit()
