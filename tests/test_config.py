"""Config validation: schema defaults, and bad input named before anything runs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import REPO

from tokenunify.config import (
    ConfigError,
    PipelineConfig,
    check_config,
    load_config,
    load_schema,
    validate_config,
)

SYN = "synthetic://em?shape=8,64,64&seed=1"


def base():
    return {"datasets": {"d1": {"raw": {"source": SYN, "key": "raw"},
                                "labels": {"source": SYN, "key": "labels"},
                                "roles": ["train"]}}}


def test_defaults_are_filled():
    cfg = validate_config(base())
    assert cfg["tokenize"]["crop"] == [16, 160, 160]
    assert cfg["download"]["block"] == [32, 256, 256]
    assert cfg["datasets"]["d1"]["raw"]["allow_missing"] is False
    assert cfg["datasets"]["d1"]["bbox"] is None
    assert set(cfg["experiments"]) == {"tokenunify", "mae", "none"}
    typed = PipelineConfig.from_dict(base())
    assert typed.datasets["d1"].voxel_size is None and typed.tokenize.patch == (4, 16, 16)


def _walk(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}.{key}", sub
        yield from _walk(sub, f"{path}.{key}")


def test_every_schema_key_has_a_description_and_a_default_or_is_required():
    root = load_schema()
    for name, d in root["$defs"].items():
        for key, sub in _walk(d, name):
            assert "description" in sub, key
            required = d.get("required", []) + sum(
                (p.get("required", []) for p in d.get("properties", {}).values()), [])
            assert "default" in sub or key.split(".")[-1] in required, key
    for key, sub in _walk(root):
        assert "description" in sub, key


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["datasets"]["d1"].update(rols=["train"]), "unknown key 'rols' (did you mean 'roles'?)"),
    (lambda c: c["datasets"]["d1"].update(roles=["trian"]), "datasets.d1.roles[0]: 'trian' is not one of"),
    (lambda c: c.update(tokenise={}), "unknown key 'tokenise' (did you mean 'tokenize'?)"),
    (lambda c: c["datasets"].update({"bad/name": c["datasets"]["d1"]}), "invalid name 'bad/name'"),
    (lambda c: c["tokenize"].update(crop=[16, 160]) if "tokenize" in c else c.update(
        tokenize={"crop": [16, 160]}), "tokenize.crop"),
    (lambda c: c["datasets"]["d1"]["raw"].update(mip=-1), "datasets.d1.raw.mip"),
])
def test_schema_errors_name_the_key(mutate, message):
    cfg = base()
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert message in str(e.value)


def test_deep_checks(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["raw"] = np.zeros((4, 16, 16), np.uint8)
        f["lab"] = np.zeros((4, 16, 17), np.uint32)

    def cfg(**ds):
        d = {"raw": {"source": str(tmp_path / "a.h5"), "key": "raw"}, "voxel_size": [40, 4, 4],
             "roles": ["pretrain"]}
        d.update(ds)
        return {"datasets": {"x": d}, "experiments": {"none": {"pretraining": "none"}}}

    check_config(cfg())
    cases = [
        (cfg(raw={"source": str(tmp_path / "missing.h5"), "key": "raw"}),
         "datasets.x.raw.source: file not found"),
        (cfg(raw={"source": str(tmp_path / "a.h5"), "key": "volumes/raw"}),
         "datasets.x.raw.key: no dataset 'volumes/raw'"),
        (cfg(labels={"source": str(tmp_path / "a.h5"), "key": "lab"}),
         "raw shape [4, 16, 16] (z, y, x)"),
        (cfg(roles=["test"]), "role 'test' needs labels"),
        (cfg(bbox={"start": [0, 0, 0], "stop": [5, 16, 16]}), "datasets.x.bbox: axis z"),
        (cfg(voxel_size=None), "datasets.x.voxel_size: not set"),
    ]
    for c, msg in cases:
        with pytest.raises(ConfigError) as e:
            check_config(c)
        assert msg in str(e.value)


def test_pretraining_needs_pretrain_data_and_a_crop_divisible_by_16():
    cfg = base()
    with pytest.raises(ConfigError, match="no dataset has role 'pretrain'"):
        check_config(cfg)
    cfg["datasets"]["d1"]["roles"] = ["pretrain", "train"]
    cfg["tokenize"] = {"crop": [16, 40, 40], "patch": [4, 8, 8]}
    with pytest.raises(ConfigError, match=r"tokenize.crop \[16, 40, 40\]: EMmamba needs"):
        check_config(cfg)
    cfg["tokenize"]["crop"] = [16, 48, 48]
    check_config(cfg)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("datasets: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


@pytest.mark.parametrize("path", sorted((REPO / "config").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_validate(path: Path):
    """The demo and every example config stay in step with the schema."""
    validate_config(yaml.safe_load(path.read_text()))
