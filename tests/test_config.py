"""Config validation: schema defaults, and bad input named before anything runs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import GALA, ISBI, MIRROR, NEUROPROOF, REPO, need

from tokenunify.config import (
    ConfigError,
    PipelineConfig,
    check_config,
    load_config,
    load_schema,
    validate_config,
)

SYN = "synthetic://em?shape=16,96,96&seed=1"


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
        d.update(ds)  # no experiments: only the dataset checks; a crop that fits the volume
        return {"datasets": {"x": d}, "experiments": {}, "tokenize": {"crop": [4, 16, 16]}}

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


# --------------------------------------------------------------------------- limits at check
# Each of these used to pass `check` and fail (or pad silently) only when its stage ran.


def limits_config() -> dict:
    """Passes check_config: d1 (16 x 96 x 96) pretrains and trains, t1 (16 x 64 x 64) is tested;
    crops, windows and blocks sized to fit them."""
    def ds(shape, seed, roles):
        src = f"synthetic://em?shape={shape}&seed={seed}"
        return {"raw": {"source": src, "key": "raw"}, "labels": {"source": src, "key": "labels"},
                "roles": roles}

    return {"datasets": {"d1": ds("16,96,96", 1, ["pretrain", "train"]),
                         "t1": ds("16,64,64", 2, ["test"])},
            "experiments": {"none": {"pretraining": "none"}},
            "tokenize": {"crop": [16, 64, 64]},
            "finetune": {"crop": [16, 64, 64]},
            "infer": {"window": [16, 64, 64], "overlap": [8, 32, 32]},
            "agglomerate": {"block": [16, 64, 64], "tile": 32}}


def _set(section, **kw):
    return lambda c: c.setdefault(section, {}).update(kw)


@pytest.mark.parametrize("mutate, message", [
    (_set("finetune", crop=[16, 40, 40]),
     r"finetune.crop \[16, 40, 40\]: EMmamba needs every axis a multiple of 16"),
    (_set("finetune", crop=[16, 112, 112]),
     r"finetune.crop \[16, 112, 112\] is larger than train dataset 'd1' of shape \[16, 96, 96\]"),
    (_set("tokenize", crop=[16, 80, 80]),
     r"tokenize.crop \[16, 80, 80\] is larger than dataset 't1' of shape \[16, 64, 64\]"),
    (_set("infer", overlap=[8, 64, 32]),
     r"infer.overlap \[8, 64, 32\] must be >= 0 and smaller than infer.window \[16, 64, 64\]"),
    (_set("infer", window=[16, 72, 64]),
     r"infer.window \[16, 72, 64\]: EMmamba needs every axis a multiple of 16"),
    (_set("agglomerate", block=[16, 64, 48]),
     r"agglomerate.block \[16, 64, 48\]: y and x must be multiples of agglomerate.tile \(32\)"),
    (lambda c: c["datasets"]["d1"].update(roles=["pretrain"]),
     r"fine-tuning needs a dataset with role 'train'"),
    (_set("infer", window=[16, 80, 80], overlap=[8, 32, 32]),
     r"infer.window \[16, 80, 80\] is larger than test dataset 't1' of shape \[16, 64, 64\]"),
    (_set("agglomerate", fragments="waterz", tile_z=32),
     r"agglomerate.block \[16, 64, 64\]: z must be a multiple of agglomerate.tile_z \(32\)"),
], ids=["finetune-crop-16", "finetune-crop-size", "tokenize-crop-size", "infer-overlap",
        "infer-window-16", "agglomerate-tile", "no-train-dataset", "infer-window-size",
        "agglomerate-tile-z"])
def test_late_limits_fail_at_check(mutate, message):
    check_config(limits_config())
    cfg = limits_config()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_agglomerate_tile_limit_only_applies_to_blockwise():
    cfg = limits_config()
    cfg["agglomerate"].update(block=[16, 64, 48], method="waterz", fragments="waterz")
    check_config(cfg)


def test_every_size_problem_is_listed():
    cfg = limits_config()
    cfg["tokenize"]["crop"] = [16, 112, 112]
    cfg["infer"]["window"] = [16, 80, 80]
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert msg.startswith("3 problems:")
    assert "tokenize.crop [16, 112, 112] is larger than dataset 'd1'" in msg
    assert "tokenize.crop [16, 112, 112] is larger than dataset 't1'" in msg
    assert "infer.window [16, 80, 80] is larger than test dataset 't1'" in msg


def test_negative_voxel_size_says_must_be_positive():
    for bad in ([-4, 8, 8], [40, 0, 8]):
        cfg = base()
        cfg["datasets"]["d1"]["voxel_size"] = bad
        with pytest.raises(ConfigError) as e:
            validate_config(cfg)
        assert "datasets.d1.voxel_size[" in str(e.value)
        assert "must be positive" in str(e.value)
        assert "null" not in str(e.value)
    cfg = base()
    cfg["datasets"]["d1"]["labels"] = {"key": "labels"}  # the non-null branch's error
    with pytest.raises(ConfigError, match="datasets.d1.labels: 'source' is a required property"):
        validate_config(cfg)


def _h5_test_dataset(path, labels):
    with h5py.File(path, "w") as f:
        f["raw"] = np.random.default_rng(0).integers(0, 255, labels.shape, dtype=np.uint8)
        f["labels"] = labels
    return {"raw": {"source": str(path), "key": "raw"},
            "labels": {"source": str(path), "key": "labels"},
            "voxel_size": [40, 8, 8], "roles": ["test"]}


def test_all_zero_test_labels_fail_at_check(tmp_path):
    labels = np.zeros((16, 64, 80), np.uint32)
    cfg = limits_config()
    cfg["download"] = {"block": [8, 32, 32]}  # 12 blocks, all read
    cfg["datasets"]["t1"] = _h5_test_dataset(tmp_path / "zero.h5", labels)
    with pytest.raises(ConfigError, match=r"datasets.t1.labels: every voxel of .*zero.h5 \(key "
                                          r"labels\) is 0, shape \[16, 64, 80\]"):
        check_config(cfg)
    labels[-1, -1, -1] = 7  # one labelled voxel in the last block is enough
    cfg["datasets"]["t1"] = _h5_test_dataset(tmp_path / "one.h5", labels)
    check_config(cfg)
    cfg["datasets"]["t1"]["bbox"] = {"start": [0, 0, 0], "stop": [16, 64, 64]}
    with pytest.raises(ConfigError, match=r"is 0 inside datasets.t1.bbox"):
        check_config(cfg)


def test_first_nonzero_block_stops_at_the_first_one():
    from tokenunify.checks import first_nonzero_block

    class Counted:
        def __init__(self, a):
            self.a, self.shape, self.reads = a, a.shape, 0

        def read(self, box):
            self.reads += 1
            return self.a[box]

    a = np.ones((8, 8, 8), np.uint64)
    vol = Counted(a)
    assert first_nonzero_block(vol, (4, 4, 4)) == (slice(0, 4), slice(0, 4), slice(0, 4))
    assert vol.reads == 1
    a[:] = 0
    vol = Counted(a)
    assert first_nonzero_block(vol, (4, 4, 4)) is None and vol.reads == 8


def test_cli_check_names_the_key(tmp_path, caplog):
    from tokenunify.cli import main

    cfg = limits_config()
    cfg["infer"]["overlap"] = [16, 32, 32]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check", "--config", str(path)]) == 2
    assert "infer.overlap [16, 32, 32] must be >= 0 and smaller than infer.window" in caplog.text
    cfg = limits_config()
    cfg["datasets"]["t1"]["voxel_size"] = [-40, 8, 8]
    path.write_text(yaml.safe_dump(cfg))
    caplog.clear()
    assert main(["check", "--config", str(path)]) == 2
    assert "datasets.t1.voxel_size[0]: must be positive, got -40" in caplog.text


@pytest.mark.parametrize("name, env", [("config/config.yaml", {}),
                                       ("config/examples/neuroproof.yaml",
                                        {"TOKENUNIFY_MIRROR": MIRROR}),
                                       ("config/examples/neuroproof_ablation.yaml",
                                        {"TOKENUNIFY_MIRROR": MIRROR})])
def test_shipped_configs_pass_the_deep_check(name, env, monkeypatch):
    """The demo, and the examples whose data is here, pass every check (the other examples
    point at placeholder paths). The real datasets' public addresses are read from the local
    copies through TOKENUNIFY_MIRROR, with their SHA-256 checked."""
    if env:
        need(NEUROPROOF)
        need(GALA)
        need(ISBI)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    check_config(yaml.safe_load((REPO / name).read_text()))


def test_test_dataset_overlapping_train_or_validate_is_a_leak():
    """A test dataset that shares voxels with a train or validate dataset of the same source is
    an error naming both datasets and the overlapping box; disjoint z ranges pass."""
    src = "synthetic://em?shape=64,64,64&seed=4"

    def ds(start, stop, roles, source=src):
        return {"raw": {"source": source, "key": "raw"},
                "labels": {"source": source, "key": "labels"},
                "bbox": {"start": start, "stop": stop}, "roles": roles}

    cfg = {"datasets": {"tr": ds([0, 0, 0], [32, 64, 64], ["train"]),
                        "va": ds([32, 0, 0], [48, 64, 64], ["validate"]),
                        "te": ds([48, 0, 0], [64, 64, 64], ["test"])},
           "experiments": {"none": {"pretraining": "none"}},
           "tokenize": {"crop": [16, 32, 32]}, "finetune": {"crop": [16, 32, 32]},
           "infer": {"window": [16, 32, 32], "overlap": [8, 16, 16]}}
    check_config(cfg)
    cfg["datasets"]["te"]["bbox"]["start"] = [40, 0, 0]
    with pytest.raises(ConfigError, match=r"datasets.te \(test\) overlaps datasets.va "
                                          r"\(validate\) in .* at z 40:48, y 0:64, x 0:64"):
        check_config(cfg)
    cfg["datasets"]["te"]["bbox"]["start"] = [48, 0, 0]
    cfg["datasets"]["tr"].pop("bbox")  # the whole source: includes the test range
    with pytest.raises(ConfigError, match=r"datasets.te \(test\) overlaps datasets.tr \(train\) "
                                          r"in .* at z 48:64"):
        check_config(cfg)
    other = "synthetic://em?shape=64,64,64&seed=5"  # another source: no leak
    cfg["datasets"]["tr"] = ds([0, 0, 0], [64, 64, 64], ["train"], other)
    check_config(cfg)
