"""Neuroglancer export (tokenunify.export) read back with cloud-volume, and the viewer
(tokenunify.viewer) opened in headless Chromium the way a person would."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from tokenunify.export import ExportConfig, run
from tokenunify.io.zarrio import create_volume

VS, OFFSET = (40.0, 8.0, 8.0), (400.0, 80.0, 160.0)  # nm; a crop starting at voxel (10, 10, 20)


@pytest.fixture
def stage_outputs(tiny_em, tmp_path):
    """A downloaded volume, a segmentation with three thresholds and affinities."""
    gt = tiny_em["labels"].astype(np.uint64)
    shape = gt.shape
    vol = zarr.open_group(str(tmp_path / "data.zarr"), mode="w")
    create_volume(vol, "raw", shape, shape, np.uint8, VS, OFFSET)[:] = tiny_em["raw"]
    create_volume(vol, "labels", shape, shape, np.uint64, VS, OFFSET)[:] = gt
    seg = zarr.open_group(str(tmp_path / "segmentation.zarr"), mode="w")
    names = []
    for t, arr in ((0.3, gt * 2), (0.5, gt), (0.7, np.where(gt % 2 == 0, gt + 1, gt))):
        names.append(f"threshold_{t:.3f}")
        create_volume(seg, names[-1], shape, shape, np.uint64, VS, OFFSET)[:] = arr
    seg.attrs.update({"thresholds": [0.3, 0.5, 0.7], "arrays": names})
    aff = zarr.open_group(str(tmp_path / "affinities.zarr"), mode="w")
    a = np.stack([np.roll(gt, 1, axis=i) == gt for i in range(3)]).astype(np.uint8) * 255
    create_volume(aff, "affinities", shape, shape, np.uint8, VS, OFFSET, channels=3,
                  attrs={"scale": 255.0})[:] = a
    return tmp_path, gt, a


def test_layers_read_back_with_cloud_volume(stage_outputs):
    from cloudvolume import CloudVolume

    root, gt, aff = stage_outputs
    out = root / "exp" / "ds" / "neuroglancer"
    manifest = run(root / "data.zarr", root / "segmentation.zarr", root / "affinities.zarr", out,
                   threshold=0.52, cfg=ExportConfig(mesh_reduction=0))
    assert manifest["threshold"] == 0.5  # the computed threshold nearest the one asked for
    assert set(manifest["layers"]) == {"raw", "affinities", "segmentation", "ground_truth"}
    assert json.loads((out / "layers.json").read_text()) == manifest
    assert not (root / "exp" / "ds" / "neuroglancer.partial").exists()
    seg = CloudVolume(f"file://{out / 'segmentation'}", progress=False)
    assert list(seg.resolution) == [8, 8, 40]  # x, y, z nm
    assert list(seg.voxel_offset) == [20, 10, 10]
    assert np.array_equal(seg[seg.bounds][..., 0], gt.T)
    a = CloudVolume(f"file://{out / 'affinities'}", progress=False)
    assert a.num_channels == 3 and np.array_equal(np.moveaxis(a[a.bounds], -1, 0),
                                                  aff.transpose(0, 3, 2, 1))
    raw = CloudVolume(f"file://{out / 'raw'}", progress=False)
    assert raw.dtype == np.uint8 and raw.layer_type == "image"
    # a mesh per body, in nm, inside the body's bounding box (offset included)
    ids = np.unique(gt[gt != 0])
    assert manifest["layers"]["segmentation"]["meshes"] == len(ids)
    body = int(ids[len(ids) // 2])
    mesh = seg.mesh.get(body)
    zz, yy, xx = np.nonzero(gt == body)
    lo = np.array([xx.min(), yy.min(), zz.min()]) * VS[::-1] + OFFSET[::-1]
    hi = (np.array([xx.max(), yy.max(), zz.max()]) + 1) * VS[::-1] + OFFSET[::-1]
    assert len(mesh.faces) > 0
    assert np.all(mesh.vertices >= lo - VS[::-1]) and np.all(mesh.vertices <= hi + VS[::-1])


def test_export_without_segmentation_names_the_path(stage_outputs):
    root, _, _ = stage_outputs
    with pytest.raises(FileNotFoundError, match="nothing.zarr: no segmentation to export"):
        run(root / "data.zarr", root / "nothing.zarr", None, root / "out", 0.5)
    assert not (root / "out").exists() and not (root / "out.partial").exists()


def test_view_rejects_a_folder_that_is_no_export(tmp_path):
    from tokenunify.viewer import Export

    with pytest.raises(FileNotFoundError, match="not an export folder"):
        Export.open(tmp_path)


@pytest.mark.timeout(600)
def test_viewer_screenshot_in_headless_chromium(stage_outputs):
    """Chromium opens the viewer, waits for the layers, takes a screenshot: the segmentation
    layer paints segment colours (many saturated hues) over the grey raw data."""
    from PIL import Image

    from tokenunify.viewer import find_browser, view

    if find_browser() is None:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium)")
    root, gt, _ = stage_outputs
    out = root / "exp" / "ds" / "neuroglancer"
    run(root / "data.zarr", root / "segmentation.zarr", root / "affinities.zarr", out, 0.5,
        ExportConfig(meshes=False))
    viewer, servers = view([out], shot=root / "shot.png", size=(640, 480), layout="xy")
    try:
        img = np.asarray(Image.open(root / "shot.png").convert("RGB")).astype(int)
        # each file server serves its export folder only
        import requests

        base = servers[0].server_address
        url = f"http://{base[0]}:{base[1]}"
        assert requests.get(f"{url}/layers.json", timeout=10).status_code == 200
        assert requests.get(f"{url}/../../data.zarr/zarr.json", timeout=10).status_code in (
            403, 404)
    finally:
        for server in servers:
            server.shutdown()
    assert img.shape == (480, 640, 3)
    sat = img.max(-1) - img.min(-1)
    colours = {tuple(c // 32) for c in img[sat > 60]}
    assert (sat > 60).mean() > 0.05, "no segment colour drawn"
    assert len(colours) >= 8, f"only {len(colours)} hues: segments not told apart"
