"""The curriculum of the three objectives: weights alpha(t), beta(t), gamma(t).

Training progress t in [0, 1] is split into phases by ``boundaries`` (default 0.3, 0.7): random-
dominant, next-dominant, next-all-dominant. Each phase has a weight vector with ``dominant``
(about 0.73) on its task and the auxiliary weights (about 0.18 and 0.09) on the others: the
nearer task in the phase order gets the larger one. The phase membership at t is a softmax of
``-distance(t, phase) / temperature(t)``, with the temperature decaying geometrically from
``temperature[0]`` to ``temperature[1]``, so transitions are smooth early and sharp late and the
auxiliary tasks never drop to zero. Weights of inactive tasks (an ablation such as mae) are
removed and the rest renormalised to sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenunify.settings import defaults

TASKS = ("random", "next", "next_all")

_DEFAULTS = defaults("pretrain", "curriculum")


@dataclass(frozen=True)
class CurriculumConfig:
    """Boundaries in [0, 1], dominant weight, auxiliary weights (near, far), temperatures."""

    boundaries: tuple[float, float] = _DEFAULTS["boundaries"]
    dominant: float = _DEFAULTS["dominant"]
    auxiliary: tuple[float, float] = _DEFAULTS["auxiliary"]
    temperature: tuple[float, float] = _DEFAULTS["temperature"]

    def __post_init__(self):
        b0, b1 = self.boundaries
        if not 0 < b0 < b1 < 1:
            raise ValueError(f"curriculum boundaries must satisfy 0 < b0 < b1 < 1: {b0}, {b1}")


def phase_weights(cfg: CurriculumConfig) -> np.ndarray:
    """(3 phases, 3 tasks): each row the task weights of one phase."""
    d, (near, far) = cfg.dominant, cfg.auxiliary
    return np.array([[d, near, far],   # random dominant; next is the nearer task
                     [near, d, far],   # next dominant; random is the nearer (previous) task
                     [far, near, d]])  # next-all dominant


def task_weights(t: float, cfg: CurriculumConfig = CurriculumConfig(),
            active: tuple[str, ...] = TASKS) -> dict[str, float]:
    """Task weights at training progress t (0..1), over the active tasks (sum 1)."""
    t = float(np.clip(t, 0.0, 1.0))
    b0, b1 = cfg.boundaries
    intervals = [(0.0, b0), (b0, b1), (b1, 1.0)]
    dist = np.array([max(lo - t, 0.0, t - hi) for lo, hi in intervals])
    tau = cfg.temperature[0] * (cfg.temperature[1] / cfg.temperature[0]) ** t
    logits = -dist / tau
    member = np.exp(logits - logits.max())
    member /= member.sum()
    w = member @ phase_weights(cfg)
    w = {task: float(w[i]) for i, task in enumerate(TASKS) if task in active}
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}
