"""A missing chunk file of a pipeline array stops the stage that reads it, naming array and chunk.

zarr reads a missing chunk as zeros: without the check, a deleted chunk of raw, affinities or a
segmentation changed the metrics with exit 0 (issue 11, item 3).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr

from tokenunify.io.zarrio import IncompleteArrayError, create_volume


def write(path, name, data, chunks, channels=None, attrs=None):
    """``data`` as array ``name`` of the group ``path``, through the pipeline's writer."""
    g = zarr.open_group(str(path), mode="a", zarr_format=3)
    shape = data.shape[1:] if channels else data.shape
    create_volume(g, name, shape, chunks, data.dtype, (40, 8, 8), (0, 0, 0), attrs=attrs,
                  channels=channels)[:] = data
    return path


def delete(path, name, key):
    chunk = path / name / "c" / key
    assert chunk.is_file()
    chunk.unlink()


def missing(where, path, name, index):
    """pytest.raises for the error of stage ``where`` naming ``path/name`` and chunk ``index``."""
    array = re.escape(f"{path.name}/{name}")
    chunk = re.escape(f"{list(index)} (key c/{'/'.join(map(str, index))})")
    return pytest.raises(IncompleteArrayError, match=rf"^{where}: zarr array \S*{array} is "
                                                     rf"incomplete: 1 of \d+ chunks .*{chunk}")


def test_missing_raw_chunk_stops_tokenize(tmp_path, tiny_em):
    from tokenunify import tokenize
    from tokenunify.config import TokenizeConfig

    v = write(tmp_path / "v.zarr", "raw", tiny_em["raw"], (8, 32, 32))
    delete(v, "raw", "1/2/0")
    with missing("tokenize", v, "raw", (1, 2, 0)):
        tokenize.run(v, tmp_path / "t.zarr", tmp_path / "t.parquet",
                     TokenizeConfig(crop=(4, 32, 32), patch=(2, 8, 8), scheduler="synchronous"))
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "t.parquet").exists()


def test_missing_token_crop_stops_pretrain(tmp_path, tiny_em):
    from tokenunify import tokenize
    from tokenunify.config import TokenizeConfig
    from tokenunify.train.pretrain import CropSampler

    v = write(tmp_path / "v.zarr", "raw", tiny_em["raw"], (8, 32, 32))
    t = tmp_path / "t.zarr"
    tokenize.run(v, t, tmp_path / "t.parquet",
                 TokenizeConfig(crop=(4, 32, 32), patch=(2, 8, 8), scheduler="synchronous"))
    CropSampler([t], None, 0)  # complete
    delete(t, "crops", "3/0/0/0")
    with missing("pretrain", t, "crops", (3, 0, 0, 0)):
        CropSampler([t], None, 0)


def test_missing_raw_or_labels_chunk_stops_finetune(tmp_path, tiny_em):
    import torch

    from tokenunify.train.finetune import FinetuneConfig, LabelledSampler, validate

    v = tmp_path / "v.zarr"
    write(v, "raw", tiny_em["raw"], (8, 48, 48))
    write(v, "labels", tiny_em["labels"].astype(np.uint64), (8, 48, 48))
    LabelledSampler([v], (8, 32, 32), 0)  # complete
    delete(v, "labels", "0/1/1")
    with missing("finetune", v, "labels", (0, 1, 1)):
        LabelledSampler([v], (8, 32, 32), 0)
    delete(v, "raw", "1/0/1")
    with missing("finetune", v, "raw", (1, 0, 1)):  # before any prediction
        validate(torch.nn.Identity(), [v], FinetuneConfig(crop=(16, 32, 32)))


def test_missing_validation_chunk_stops_finetune_before_training(tmp_path, tiny_em):
    import torch

    from tokenunify.model import checkpoint as ckpt
    from tokenunify.model.emmamba import EMmamba, preset
    from tokenunify.train.finetune import FinetuneConfig, run

    t, v = tmp_path / "t.zarr", tmp_path / "v.zarr"
    for path in (t, v):
        write(path, "raw", tiny_em["raw"], (8, 48, 48))
        write(path, "labels", tiny_em["labels"].astype(np.uint64), (8, 48, 48))
    torch.manual_seed(0)
    net = EMmamba(preset("tiny"))
    ckpt.save({"model": net.state_dict(), "model_config": net.config.to_dict(), "step": 5},
              tmp_path / "pre.pt")
    delete(v, "labels", "1/1/1")
    cfg = FinetuneConfig(crop=(16, 32, 32), steps=4, batch_size=2, warmup_steps=1,
                         validate_every=4, checkpoint_every=4, thresholds=(0.5,))
    with missing("finetune", v, "labels", (1, 1, 1)):
        run(tmp_path / "pre.pt", [t], [v], tmp_path / "ft", "exp", cfg, progress=False)
    assert not (tmp_path / "ft").exists() and not (tmp_path / "ft.partial").exists()


def test_missing_raw_chunk_stops_infer(tmp_path, tiny_em, infer_setup):
    from tokenunify import inference

    v = write(tmp_path / "v.zarr", "raw", tiny_em["raw"], (8, 48, 48))
    delete(v, "raw", "1/1/0")
    with missing("infer", v, "raw", (1, 1, 0)):
        inference.run(v, infer_setup / "model.pt", tmp_path / "a.zarr",
                      inference.InferConfig(block=(16, 48, 48), window=(16, 32, 32),
                                            overlap=(8, 16, 16), batch_size=4))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "a.zarr.partial").exists()


def test_missing_affinities_chunk_stops_agglomerate(tmp_path, tiny_em):
    from tokenunify.affinities import seg_to_affinities
    from tokenunify.agglomerate import AgglomerateConfig, run

    aff = (seg_to_affinities(tiny_em["labels"]) * 255).astype(np.uint8)
    a = write(tmp_path / "affinities.zarr", "affinities", aff, (8, 48, 48), channels=3,
              attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]], "scale": 255.0})
    delete(a, "affinities", "0/1/0/1")
    cfg = AgglomerateConfig(block=(8, 48, 48), tile=48, context=8, scheduler="synchronous")
    with missing("agglomerate", a, "affinities", (0, 1, 0, 1)):
        run(a, tmp_path / "s.zarr", cfg)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.partial").exists()


def test_missing_segmentation_or_labels_chunk_stops_evaluate(tmp_path, tiny_em):
    from tokenunify.evaluate import run

    gt = tiny_em["labels"].astype(np.uint64)
    v = write(tmp_path / "vol.zarr", "labels", gt, (8, 48, 48))
    s = tmp_path / "seg.zarr"
    names = ["threshold_0.300", "threshold_0.500"]
    for n in names:
        write(s, n, gt, (8, 48, 48))
    zarr.open_group(str(s), mode="a").attrs.update({"thresholds": [0.3, 0.5], "arrays": names})
    out = tmp_path / "m.csv"
    assert run(s, v, out, "e", "d")["voi"].max() == 0  # complete
    out.unlink()
    delete(s, "threshold_0.500", "1/0/1")
    with missing("evaluate", s, "threshold_0.500", (1, 0, 1)):
        run(s, v, out, "e", "d")
    delete(v, "labels", "0/0/0")
    with missing("evaluate", v, "labels", (0, 0, 0)):
        run(s, v, out, "e", "d")
    assert not out.exists()
