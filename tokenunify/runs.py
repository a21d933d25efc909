"""Runs of a config: every experiment once, or once per seed (``seeds``).

A *run* is what the workflow's ``{experiment}`` wildcard names and what every per-experiment
path holds: ``results/models/{run}/...``, ``results/{run}/{dataset}/...``. Without ``seeds`` a
run is an experiment, named after it. With ``seeds: [0, 1, 2]`` each experiment runs once per
seed, as ``EXPERIMENT-seedN``, with ``pretrain.seed`` and ``finetune.seed`` set to N. This
module is the one place that knows the naming: the rules, the stages and the report ask it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

SEED_SUFFIX = "-seed"
_RUN_RE = re.compile(rf"^(?P<experiment>.+){re.escape(SEED_SUFFIX)}(?P<seed>\d+)$")


@dataclass(frozen=True)
class Run:
    """One run: ``name`` (paths), ``experiment`` (the config's entry) and ``seed`` (None:
    the config's own pretrain/finetune seeds)."""

    name: str
    experiment: str
    seed: int | None = None


def runs(config: dict) -> list[Run]:
    """Every run of a validated config, experiments in sorted order, seeds in the given order."""
    seeds = config.get("seeds")
    out = []
    for exp in sorted(config["experiments"]):
        if seeds is None:
            out.append(Run(exp, exp))
        else:
            out += [Run(f"{exp}{SEED_SUFFIX}{s}", exp, int(s)) for s in seeds]
    return out


def run_of(config: dict, name: str) -> Run:
    """The run called ``name``; KeyError naming the known runs otherwise."""
    for r in runs(config):
        if r.name == name:
            return r
    raise KeyError(f"no run {name!r}; runs: {[r.name for r in runs(config)]}")


def stage_settings(config: dict, name: str, section: str) -> dict:
    """The config section (``pretrain`` or ``finetune``) of run ``name``: its seed set to the
    run's seed when the config has ``seeds``."""
    run = run_of(config, name)
    settings = copy.deepcopy(config[section])
    if run.seed is not None:
        settings["seed"] = run.seed
    return settings
