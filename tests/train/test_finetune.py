"""Fine-tuning: pretrained weights loaded with dropped keys listed, targets, parts, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from tokenunify.io.zarrio import create_volume
from tokenunify.model import checkpoint as ckpt
from tokenunify.model.emmamba import EMmamba, preset
from tokenunify.settings import from_section
from tokenunify.train.augment import AugmentConfig
from tokenunify.train.finetune import (
    FinetuneConfig,
    make_sample,
    run,
    set_trainable,
    weighted_mse,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_em):
    d = tmp_path_factory.mktemp("ft")
    for name, sl in (("train", slice(0, 96)), ("val", slice(0, 64))):
        g = zarr.open_group(str(d / f"{name}.zarr"), mode="w")
        shape = (16, 64, 64) if name == "val" else (16, 96, 96)
        create_volume(g, "raw", shape, shape, np.uint8, (40, 8, 8), (0, 0, 0))[:] = \
            tiny_em["raw"][:, sl, sl]
        create_volume(g, "labels", shape, shape, np.uint64, (40, 8, 8), (0, 0, 0))[:] = \
            tiny_em["labels"][:, sl, sl]
    torch.manual_seed(0)
    net = EMmamba(preset("tiny"))  # 1 output channel, as pretraining
    ckpt.save({"model": net.state_dict(), "model_config": net.config.to_dict(), "step": 5},
              d / "pre.pt")
    return d


def test_sample_targets_and_loss(tiny_em):
    cfg = FinetuneConfig(crop=(16, 32, 32), augment=AugmentConfig(flip=0, rotate=0, elastic=0,
                                                                  intensity=0, misalign=0,
                                                                  missing_section=0))
    raw, lab = tiny_em["raw"][:, :32, :32], tiny_em["labels"][:, :32, :32]
    x, t, w = make_sample(raw, lab, 0, cfg)
    assert x.shape == (1, 16, 32, 32) and t.shape == w.shape == (3, 16, 32, 32)
    assert abs(float(x.mean())) < 1e-4  # standardised like pretraining
    assert (w[0, 0] == 0).all() and (w[2, :, :, 0] == 0).all()  # first planes are unknown
    assert t.min() == 0 and t.max() == 1
    p = torch.from_numpy(t)[None]
    assert float(weighted_mse(p, p, torch.from_numpy(w)[None])) == 0.0
    lr_cfg = FinetuneConfig(long_range=((0, -4, 0),))
    assert len(lr_cfg.offsets) == 4


def test_parts():
    net = EMmamba(preset("tiny", out_channels=3))
    n_all = set_trainable(net, "all")
    n_mamba = set_trainable(net, "mamba")
    assert 0 < n_mamba < n_all
    assert net.vit.stages[0][0].mamba.A_log.requires_grad
    assert not net.decoder1.layer.conv1.conv.weight.requires_grad
    set_trainable(net, "decoder")
    assert net.out.conv.conv.weight.requires_grad and not net.vit.gscs[0].proj.weight.requires_grad
    with pytest.raises(ValueError, match=r"finetune.part: 'head' is not one of"):
        from_section(FinetuneConfig, {"part": "head"}, "finetune")


def test_finetune_run_loads_pretrained_and_validates(data, tmp_path):
    cfg = FinetuneConfig(crop=(16, 32, 32), steps=4, batch_size=2, warmup_steps=1,
                         validate_every=2, checkpoint_every=2, thresholds=(0.5,))
    out = run(data / "pre.pt", [data / "train.zarr"], [data / "val.zarr"], tmp_path / "ft",
              "exp", cfg, progress=False)
    report = json.loads((out / "load_report.json").read_text())
    assert report["dropped"] == ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert report["loaded"] > 100 and report["missing"] == report["dropped"]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in lines if "val_voi" in r]
    assert len(lines) == 4 and len(vals) == 2 and all(np.isfinite(r["val_voi"]) for r in vals)
    best = ckpt.load(out / "checkpoint.pt")
    assert best["model_config"]["out_channels"] == 3
    assert best["best_voi"] == min(r["val_voi"] for r in vals)
    # decoder-only fine-tuning keeps the pretrained encoder exactly: it was loaded, then frozen
    dec = run(data / "pre.pt", [data / "train.zarr"], [], tmp_path / "dec", "exp",
              FinetuneConfig(crop=(16, 32, 32), steps=1, part="decoder"), progress=False)
    pre = ckpt.load(data / "pre.pt")["model"]
    tuned = ckpt.load(dec / "checkpoint.pt")["model"]
    for k in ("vit.stages.0.0.mamba.A_log", "vit.gscs.1.proj.weight", "encoder2.layer.conv1.conv.weight"):
        assert torch.equal(tuned[k], pre[k]), k
    assert not torch.equal(tuned["decoder1.layer.conv1.conv.weight"],
                           pre["decoder1.layer.conv1.conv.weight"])


def test_resume_continues_the_same_curve(data, tmp_path):
    cfg = FinetuneConfig(crop=(16, 32, 32), steps=5, batch_size=2, warmup_steps=1,
                         checkpoint_every=2)
    full = run(data / "pre.pt", [data / "train.zarr"], [], tmp_path / "full", "e", cfg,
               progress=False)
    assert run(data / "pre.pt", [data / "train.zarr"], [], tmp_path / "cut", "e", cfg,
               progress=False, stop_after=2) is None  # last checkpoint at step 1
    resumed = run(data / "pre.pt", [data / "train.zarr"], [], tmp_path / "cut", "e", cfg,
                  progress=False)
    la = [json.loads(ln)["loss"] for ln in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(ln)["loss"] for ln in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 5
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_ddp_prefixed_checkpoint_loads_every_encoder_tensor(data, tmp_path):
    """DDP's 'module.' prefix (distributed and official checkpoints) is stripped as in
    import-weights: every tensor but the output head loads, none is silently left random."""
    pre = ckpt.load(data / "pre.pt")
    ckpt.save({**pre, "model": {f"module.{k}": v for k, v in pre["model"].items()}},
              tmp_path / "ddp.pt")
    out = run(tmp_path / "ddp.pt", [data / "train.zarr"], [], tmp_path / "ft", "exp",
              FinetuneConfig(crop=(16, 32, 32), steps=1), progress=False)
    report = json.loads((out / "load_report.json").read_text())
    head = ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert report["missing"] == head and report["dropped"] == head
    assert report["loaded"] == len(pre["model"]) - 2 and report["loaded_share"] == 1.0
    assert report["unexpected"] == []


def test_partial_checkpoint_fails_naming_the_share(data, tmp_path):
    """Fewer tensors than finetune.min_loaded (default all but the head) is an error that
    names the file, the share loaded and missing tensors; a lower min_loaded accepts it."""
    pre = ckpt.load(data / "pre.pt")
    body = [k for k in pre["model"] if not k.startswith("out.")]
    kept = {k: v for k, v in pre["model"].items() if not k.startswith("decoder1.")}
    ckpt.save({**pre, "model": kept}, tmp_path / "part.pt")
    share = (len(body) - sum(k.startswith("decoder1.") for k in body)) / len(body)
    assert 0.5 < share < 1
    cfg = FinetuneConfig(crop=(16, 32, 32), steps=1)
    with pytest.raises(ckpt.CheckpointError) as err:
        run(tmp_path / "part.pt", [data / "train.zarr"], [], tmp_path / "ft", "exp", cfg,
            progress=False)
    msg = str(err.value)
    assert "part.pt" in msg and f"{share:.1%}" in msg and "decoder1.layer.conv1.conv.weight" in msg
    assert not (tmp_path / "ft").exists()
    with pytest.raises(ValueError, match="finetune.min_loaded: 1.5 is greater than"):
        from_section(FinetuneConfig, {"min_loaded": 1.5}, "finetune")
    out = run(tmp_path / "part.pt", [data / "train.zarr"], [], tmp_path / "ft", "exp",
              FinetuneConfig(crop=(16, 32, 32), steps=1, min_loaded=share - 0.01),
              progress=False)
    report = json.loads((out / "load_report.json").read_text())
    assert report["loaded_share"] == pytest.approx(share)


def test_random_bytes_are_not_a_torch_checkpoint(data, tmp_path):
    """Garbage is reported as such, not as a file holding pickled Python objects."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x13\x37" + np.random.default_rng(0).bytes(4000))
    with pytest.raises(ckpt.CheckpointError, match="junk.pt: not a torch checkpoint"):
        ckpt.load(junk)
    with pytest.raises(ckpt.CheckpointError, match="not a torch checkpoint"):
        run(junk, [data / "train.zarr"], [], tmp_path / "ft", "exp", FinetuneConfig(),
            progress=False)


def test_validation_merges_with_the_agglomerate_scoring(data):
    """Validation picks the checkpoint with the merge the segmentation will use: its VOI is
    waterz's own result with ``cfg.scoring`` from ``cfg.fragments`` (waterz's watershed, the
    seeded watershed in 3-D, the per-section one), as the CLI takes them from ``agglomerate``."""
    import waterz

    from tokenunify import metrics
    from tokenunify.agglomerate.fragments import distance_fragments, whole_volume_fragments
    from tokenunify.inference import InferConfig, predict_block
    from tokenunify.train.finetune import validate

    torch.manual_seed(1)
    net = EMmamba(preset("tiny", out_channels=3))
    g = zarr.open_group(str(data / "val.zarr"), mode="r")
    labels = g["labels"][:]
    aff = predict_block(g["raw"], net, tuple(slice(0, s) for s in labels.shape),
                        InferConfig(window=(16, 64, 64), overlap=(8, 32, 32), batch_size=2))[:3]
    aff = np.ascontiguousarray(aff)
    mean = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
    q85 = "OneMinus<HistogramQuantileAffinity<RegionGraphType, 85, ScoreValue, 256>>"
    cases = [(mean, "waterz", None), (q85, "waterz", None),
             (mean, "maxima_distance_3d", distance_fragments(aff).astype(np.uint64)),
             (q85, "maxima_distance", whole_volume_fragments(aff, tile=None))]
    got = []
    for scoring, fragments, frag in cases:
        cfg = FinetuneConfig(crop=(16, 64, 64), thresholds=(0.5,), scoring=scoring,
                             fragments=fragments)
        seg = next(iter(waterz.agglomerate(aff, [0.5], scoring_function=scoring,
                                           fragments=None if frag is None else frag.copy())))
        want = metrics.evaluate(labels, seg.astype(np.uint64)).voi
        got.append(validate(net, [data / "val.zarr"], cfg)["val_voi"])
        assert got[-1] == pytest.approx(want, abs=1e-9), (scoring, fragments)
