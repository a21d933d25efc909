"""The schema is the one source of defaults: every stage dataclass agrees with it, and the
stages are built from their sections one way (tokenunify.settings.from_section)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from tokenunify.agglomerate import AgglomerateConfig
from tokenunify.cluster import DaskConfig
from tokenunify.config import DownloadConfig, TokenizeConfig
from tokenunify.errors import ConfigError
from tokenunify.evaluate import EvaluateConfig
from tokenunify.export import ExportConfig
from tokenunify.inference import InferConfig
from tokenunify.objectives.curriculum import CurriculumConfig
from tokenunify.objectives.token_tasks import ObjectiveConfig
from tokenunify.settings import defaults, from_section, section_schema
from tokenunify.skeletons import SkeletonConfig
from tokenunify.train.augment import AugmentConfig
from tokenunify.train.finetune import FinetuneConfig
from tokenunify.train.pretrain import PretrainConfig

# section of the config -> the dataclass built from it
SECTIONS = {
    ("download",): DownloadConfig,
    ("tokenize",): TokenizeConfig,
    ("pretrain",): PretrainConfig,
    ("pretrain", "objective"): ObjectiveConfig,
    ("pretrain", "curriculum"): CurriculumConfig,
    ("finetune",): FinetuneConfig,
    ("finetune", "augment"): AugmentConfig,
    ("infer",): InferConfig,
    ("infer", "dask"): DaskConfig,
    ("agglomerate",): AgglomerateConfig,
    ("agglomerate", "dask"): DaskConfig,
    ("evaluate",): EvaluateConfig,
    ("evaluate", "skeletons"): SkeletonConfig,
    ("export",): ExportConfig,
}
# fields that are not config keys: set at run time by the command line or another section
RUNTIME = {
    DownloadConfig: {"workers"},
    TokenizeConfig: {"workers"},
    FinetuneConfig: {"scoring", "fragments"},  # agglomerate.scoring and .fragments
    AugmentConfig: {"raw_order"},
    InferConfig: {"threads_per_worker"},
}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@pytest.mark.parametrize("path", list(SECTIONS), ids=".".join)
def test_every_schema_default_is_the_dataclass_default(path):
    cls = SECTIONS[path]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    keys = section_schema(*path).get("properties", {})
    assert set(fields) - set(keys) == RUNTIME.get(cls, set()), "fields that are not config keys"
    assert set(keys) <= set(fields), "config keys that the dataclass lacks"
    wrong = {}
    for key, value in defaults(*path).items():
        got = _default(fields[key])
        nested = section_schema(*path, key).get("properties")
        if nested is not None:  # a nested section: compare its defaults, filled by the schema
            value = {k: _plain(v) for k, v in defaults(*path, key).items()}
            got = {k: v for k, v in _plain(got).items() if k in value}
        if _plain(got) != _plain(value):
            wrong[key] = (value, got)
    assert not wrong, f"{'.'.join(path)}: schema default != dataclass default: {wrong}"


def test_from_section_fills_defaults_and_nested_sections():
    cfg = from_section(AgglomerateConfig, {"thresholds": [0.5], "dask": {"max_jobs": 3}},
                       "agglomerate")
    assert cfg.thresholds == (0.5,) and cfg.block == defaults("agglomerate")["block"]
    assert isinstance(cfg.dask, DaskConfig) and cfg.dask.max_jobs == 3
    f = from_section(FinetuneConfig, {"augment": {"flip": 0.0}, "long_range": [[-3, 0, 0]]},
                     "finetune", scoring="OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>")
    assert f.augment.flip == 0.0 and f.augment.rotate == defaults("finetune", "augment")["rotate"]
    assert f.long_range == ((-3, 0, 0),)


def test_from_section_names_the_bad_key():
    with pytest.raises(ConfigError, match=r"agglomerate.scheduler: 'thread' is not one of"):
        from_section(AgglomerateConfig, {"scheduler": "thread"}, "agglomerate")
    with pytest.raises(ConfigError, match=r"infer: unknown key 'blok' \(did you mean 'block'"):
        from_section(InferConfig, {"blok": [1, 2, 3]}, "infer")


README = Path(__file__).resolve().parents[1] / "config" / "README.md"
KEY = re.compile(r"^`([a-z_]+(?:\.[a-z_]+)+)`$")
DEFAULT = re.compile(r"^`([^`]*)`")


def _schema_keys(path=(), node=None):
    """(dotted key, default) of every key below the stage sections that has a default."""
    for key, sub in section_schema(*path).get("properties", {}).items() if path else []:
        full = (*path, key)
        nested = section_schema(*full).get("properties")
        if nested and key not in ("dataset_weights",):
            yield from _schema_keys(full)
        elif "default" in sub:
            yield ".".join(full), sub["default"]


def test_config_readme_states_every_default_as_the_schema():
    """config/README.md documents each stage key with its default; every one is the schema's."""
    documented = {}
    for line in README.read_text().splitlines():
        # a key row: | `section.key` | [type |] `default` | meaning |
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = KEY.match(cells[0]) if len(cells) in (3, 4) else None
        default = DEFAULT.match(cells[-2]) if key else None
        if key and default:
            documented[key.group(1)] = yaml.safe_load(default.group(1))
    # finetune and infer: the README points to the schema and lists a few keys (checked too)
    listed = ("download", "tokenize", "pretrain", "agglomerate", "evaluate", "export", "report")
    keys = dict(kv for s in (*listed, "finetune", "infer") for kv in _schema_keys((s,)))
    missing = sorted(k for k in keys if k not in documented and k.split(".")[0] in listed
                     and ".dask." not in k)
    wrong = {k: (keys[k], documented[k]) for k in keys
             if k in documented and _plain(documented[k]) != _plain(keys[k])}
    assert not missing, f"config/README.md does not document {missing}"
    assert not wrong, f"config/README.md states other defaults than the schema: {wrong}"
