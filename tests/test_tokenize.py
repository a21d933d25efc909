"""Tokenize stage: token layout, filters, and bit-identical output whatever the Dask chunking."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import zarr

from tokenunify import tokenize
from tokenunify.config import TokenizeConfig
from tokenunify.io.zarrio import create_volume

CFG = TokenizeConfig(crop=(4, 32, 32), patch=(2, 8, 8), scheduler="synchronous")


def make_volume(path, raw, chunks=(4, 32, 32)):
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    a = create_volume(g, "raw", raw.shape, chunks, np.uint8, (40, 8, 8), (0, 0, 0))
    a[:] = raw
    return path


@pytest.fixture
def em_volume(tmp_path, tiny_em):
    return make_volume(tmp_path / "v.zarr", tiny_em["raw"])


def test_patchify_order_and_roundtrip(rng):
    crop = rng.random((4, 16, 24))
    t = tokenize.patchify(crop, (2, 8, 8))
    assert t.shape == (2 * 2 * 3, 2 * 8 * 8)
    # Token 4 is patch (z=0, y=1, x=1) in z-y-x raster order.
    np.testing.assert_array_equal(t[4], crop[0:2, 8:16, 8:16].ravel())
    np.testing.assert_array_equal(tokenize.unpatchify(t, crop.shape, (2, 8, 8)), crop)


def test_crop_positions_cover_edges():
    pos = tokenize.crop_positions((10, 70, 64), (4, 32, 32))
    assert sorted(set(pos[:, 0])) == [0, 4, 6] and sorted(set(pos[:, 1])) == [0, 32, 38]
    assert len(tokenize.crop_positions((10, 70, 64), (4, 32, 32), cover_edges=False)) == 2 * 2 * 2
    assert len(tokenize.crop_positions((3, 70, 64), (4, 32, 32))) == 0


def run(vol, tmp_path, name, cfg=CFG):
    df = tokenize.run(vol, tmp_path / f"{name}.zarr", tmp_path / f"{name}.parquet", cfg)
    return df, zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")


def test_same_tokens_whatever_chunking_and_workers(em_volume, tmp_path):
    ref_df, ref = run(em_volume, tmp_path, "ref")
    variants = [
        dataclasses.replace(CFG, chunks=(3, 20, 45)),  # misaligned with crops and zarr chunks
        dataclasses.replace(CFG, chunks=(16, 96, 96), scheduler="threads", workers=2),
        dataclasses.replace(CFG, chunks=(5, 7, 96), scheduler="threads", workers=1),
    ]
    for i, cfg in enumerate(variants):
        df, out = run(em_volume, tmp_path, f"v{i}", cfg)
        for name in ("crops", "mean", "std", "position"):
            np.testing.assert_array_equal(out[name][:], ref[name][:], err_msg=f"{name} {cfg}")
        pd.testing.assert_frame_equal(df, ref_df)
    assert ref["crops"].chunks == (1, 4, 32, 32)  # one chunk read per crop
    assert ref.attrs["tokens_per_crop"] == 2 * 4 * 4
    assert ref.attrs["voxel_size"] == [40.0, 8.0, 8.0]


def test_written_crops_and_normalisation_match_the_volume(em_volume, tmp_path, tiny_em):
    df, out = run(em_volume, tmp_path, "a")
    raw = tiny_em["raw"]
    tc = tokenize.TokenCrops(tmp_path / "a.zarr")
    for i in range(len(tc)):
        z, y, x = out["position"][i]
        crop = raw[z:z + 4, y:y + 32, x:x + 32]
        np.testing.assert_array_equal(out["crops"][i], crop)
        norm = (crop - crop.mean()) / crop.std()
        np.testing.assert_allclose(tc.crop(i), norm, atol=1e-4)
        np.testing.assert_allclose(tc.tokens(i), tokenize.patchify(norm, (2, 8, 8)), atol=1e-4)
    assert (df.loc[df["kept"], "index"].to_numpy() == np.arange(len(tc))).all()


def test_invalid_crops_are_dropped_with_reasons(tmp_path, rng):
    raw = rng.integers(60, 200, (8, 64, 64), dtype=np.uint8)
    raw[0:4, 0:32, 0:32] = 0  # zero fill (padding)
    raw[0:4, 0:32, 32:64] = 128  # flat, empty
    raw[5, 32:64, 0:32] = 0  # one missing (zero-filled) section
    raw[6, 32:64, 32:64] = 90  # one blank section
    df, out = run(make_volume(tmp_path / "v.zarr", raw), tmp_path, "t")
    reasons = {(r.z, r.y, r.x): r.reason for r in df.itertuples()}
    assert reasons[(0, 0, 0)] == "zero_fill"
    assert reasons[(0, 0, 32)] == "empty"
    assert reasons[(4, 32, 0)] == "defective_section"
    assert reasons[(4, 32, 32)] == "defective_section"
    assert reasons[(0, 32, 0)] == "" and out["crops"].shape[0] == int(df["kept"].sum()) == 4
    loose = dataclasses.replace(CFG, max_defective_sections=1)
    df2, _ = run(tmp_path / "v.zarr", tmp_path, "t2", loose)
    assert df2["kept"].sum() == 6


def test_per_volume_normalisation(em_volume, tmp_path, tiny_em):
    df, out = run(em_volume, tmp_path, "pv", dataclasses.replace(CFG, normalize="per_volume"))
    kept = df[df["kept"]]
    n = kept["n"].sum()
    mean = kept["sum"].sum() / n
    assert np.allclose(out["mean"][:], mean)
    assert np.allclose(out["std"][:], np.sqrt(kept["sumsq"].sum() / n - mean**2))


def test_volume_smaller_than_crop_is_a_clear_error(tmp_path, rng):
    vol = make_volume(tmp_path / "s.zarr", rng.integers(0, 255, (2, 20, 20), dtype=np.uint8),
                      chunks=(2, 20, 20))
    with pytest.raises(ValueError, match="smaller than tokenize.crop"):
        run(vol, tmp_path, "s")
