"""The export stage: one experiment's result on one test dataset as Neuroglancer precomputed
layers, the format chunkflow and igneous write and Neuroglancer reads natively.

Layers, each a precomputed volume written with cloud-volume under the export folder::

    raw/           uint8 image
    affinities/    uint8 image, 3 channels (z, y, x affinities scaled to 0-255)
    segmentation/  uint64 segmentation (compressed_segmentation) at the chosen threshold,
                   with a mesh per segment (zmesh marching cubes, simplified)
    ground_truth/  uint64 segmentation with meshes (when the dataset has labels)
    layers.json    what was written: layer names, threshold, voxel size (nm), offset (nm)

Precomputed stores (x, y, z); our arrays are (z, y, x), so every array is transposed on write,
``resolution`` is the voxel size reversed (nm) and ``voxel_offset`` the dataset's offset in
voxels (its bounding-box start), so the layers overlay any other volume of the same stack in
physical space. Meshes are in nm, offset included. Chunk files are gzip-compressed, as
cloud-volume writes them: open the folder with ``tokenunify view`` (or ``igneous view``),
which serves them decompressed; a plain static file server does not.

The folder is written under a ``.partial`` name and renamed when complete, so a folder that
exists is whole. The volumes are read whole into memory: fine for evaluation crops; a large
volume needs igneous' downsampling and meshing tasks, not built here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from tokenunify.io.zarrio import require_complete
from tokenunify.settings import defaults

log = logging.getLogger(__name__)

_DEFAULTS = defaults("export")
LAYERS = ("raw", "affinities", "segmentation", "ground_truth")
MANIFEST = "layers.json"


@dataclass
class ExportConfig:
    """chunk: (z, y, x) voxels per precomputed chunk. meshes: write segment meshes.
    mesh_reduction: zmesh's target triangle reduction factor. mesh_max_error_nm: the largest
    distance a simplified mesh may move from the marching-cubes surface (nm)."""

    chunk: tuple = _DEFAULTS["chunk"]
    meshes: bool = _DEFAULTS["meshes"]
    mesh_reduction: int = _DEFAULTS["mesh_reduction"]
    mesh_max_error_nm: float = _DEFAULTS["mesh_max_error_nm"]

    def __post_init__(self):
        self.chunk = tuple(int(c) for c in self.chunk)


def _geometry(array) -> tuple[np.ndarray, np.ndarray]:
    """(voxel size nm, offset nm), both (z, y, x), from a volume's attributes."""
    vs = array.attrs.get("voxel_size")
    if vs is None:
        raise ValueError(f"{array.store_path}: no 'voxel_size' attribute (nm, z y x)")
    off = array.attrs.get("offset", [0.0, 0.0, 0.0])
    return np.asarray(vs, np.float64), np.asarray(off, np.float64)


def write_layer(url: str, data: np.ndarray, voxel_size, offset_nm, layer_type: str,
                cfg: ExportConfig) -> None:
    """One precomputed layer at ``url`` from ``data`` ((z, y, x) or (c, z, y, x)), with
    ``voxel_size`` and ``offset_nm`` (z, y, x) nm."""
    from cloudvolume import CloudVolume

    vs = np.asarray(voxel_size, np.float64)
    voxel_offset = np.asarray(offset_nm, np.float64) / vs
    if not np.allclose(voxel_offset, np.rint(voxel_offset)):
        log.warning("%s: offset %s nm is not a whole number of voxels; rounded", url,
                    list(offset_nm))
    xyz = data.T if data.ndim == 3 else np.moveaxis(data, 0, -1).transpose(2, 1, 0, 3)
    seg = layer_type == "segmentation"
    info = CloudVolume.create_new_info(
        num_channels=1 if data.ndim == 3 else data.shape[0], layer_type=layer_type,
        data_type=str(data.dtype), encoding="compressed_segmentation" if seg else "raw",
        resolution=vs[::-1].tolist(), voxel_offset=np.rint(voxel_offset[::-1]).astype(int).tolist(),
        volume_size=list(xyz.shape[:3]), mesh="mesh" if seg and cfg.meshes else None,
        chunk_size=list(cfg.chunk[::-1]))
    vol = CloudVolume(url, info=info, progress=False, fill_missing=False)
    vol.commit_info()
    vol[vol.bounds] = np.ascontiguousarray(xyz)


def write_meshes(url: str, labels: np.ndarray, voxel_size, offset_nm, cfg: ExportConfig) -> int:
    """A legacy precomputed mesh per non-zero segment of ``labels`` ((z, y, x)) into the
    segmentation layer at ``url``; vertices in nm. Returns the number of meshes."""
    import zmesh
    from cloudfiles import CloudFiles
    from cloudvolume import CloudVolume, Mesh

    vs = np.asarray(voxel_size, np.float64)
    mesher = zmesh.Mesher(tuple(vs[::-1]))
    mesher.mesh(np.asfortranarray(labels.T), close=True)
    shift = np.asarray(offset_nm, np.float64)[::-1]
    meshes = []
    for segid in tqdm(mesher.ids(), desc="meshes", leave=False, disable=None):
        m = mesher.get(segid, normals=False, reduction_factor=cfg.mesh_reduction,
                       max_error=cfg.mesh_max_error_nm)
        mesher.erase(segid)
        if len(m.faces):
            meshes.append(Mesh(m.vertices + shift, m.faces, None, segid=int(segid)))
    mesher.clear()
    vol = CloudVolume(url, progress=False)
    CloudFiles(url).put_json("mesh/info", {"@type": "neuroglancer_legacy_mesh"})
    vol.mesh.put(meshes)
    return len(meshes)


def _segmentation_at(segmentation: Path, threshold: float):
    """(array, threshold) of the segmentation computed nearest ``threshold``."""
    if not Path(segmentation).exists():
        raise FileNotFoundError(f"{segmentation}: no segmentation to export (run the "
                                f"agglomerate stage for this experiment and dataset first)")
    root = zarr.open_group(str(segmentation), mode="r")
    names, thresholds = root.attrs.get("arrays"), root.attrs.get("thresholds")
    if not names or not thresholds:
        raise ValueError(f"{segmentation}: no 'arrays'/'thresholds' attributes; not written by "
                         f"the agglomerate stage")
    i = int(np.argmin(np.abs(np.asarray(thresholds, float) - threshold)))
    if names[i] not in root:
        raise ValueError(f"{segmentation}: threshold array {names[i]!r} is listed but missing")
    return root[names[i]], float(thresholds[i])


def run(volume: str | Path, segmentation: str | Path, affinities: str | Path | None,
        out: str | Path, threshold: float, cfg: ExportConfig | None = None) -> dict:
    """Export ``volume`` (raw, labels), ``segmentation`` (at the computed threshold nearest
    ``threshold``) and ``affinities`` to the folder ``out``; returns the manifest.

    Raises:
        FileNotFoundError / ValueError naming the path: no segmentation, an incomplete array,
            shapes that disagree, a volume without voxel size.
    """
    cfg = cfg or ExportConfig()
    out = Path(out)
    seg, t = _segmentation_at(Path(segmentation), threshold)
    root = zarr.open_group(str(volume), mode="r")
    if "raw" not in root:
        raise ValueError(f"{volume}: no 'raw' array to export")
    raw = root["raw"]
    arrays = {"raw": raw, "segmentation": seg}
    if "labels" in root:
        arrays["ground_truth"] = root["labels"]
    if affinities is not None:
        aff_root = zarr.open_group(str(affinities), mode="r")
        if "affinities" not in aff_root:
            raise ValueError(f"{affinities}: no 'affinities' array")
        arrays["affinities"] = aff_root["affinities"]
    for name, arr in arrays.items():
        require_complete(arr, "export")
        if tuple(arr.shape[-3:]) != tuple(raw.shape):
            raise ValueError(f"export: {name} has shape {tuple(arr.shape)}, raw of {volume} "
                             f"{tuple(raw.shape)}")
    vs, off = _geometry(raw)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = {}
    for name in LAYERS:
        if name not in arrays:
            continue
        data = np.asarray(arrays[name][...])
        if name == "affinities":
            scale = float(arrays[name].attrs.get("scale", 1.0))
            data = np.clip(np.rint(data.astype(np.float32) * (255.0 / scale)), 0, 255)
            data = data.astype(np.uint8)
        elif name in ("segmentation", "ground_truth"):
            data = data.astype(np.uint64)
        layer_type = "segmentation" if name in ("segmentation", "ground_truth") else "image"
        url = f"file://{(partial / name).resolve()}"
        write_layer(url, data, vs, off, layer_type, cfg)
        n_mesh = write_meshes(url, data, vs, off, cfg) if layer_type == "segmentation" and \
            cfg.meshes else 0
        written[name] = {"type": layer_type, "channels": 1 if data.ndim == 3 else data.shape[0],
                         "meshes": n_mesh}
        log.info("export %s: %s %s%s", name, layer_type, tuple(data.shape),
                 f", {n_mesh} meshes" if n_mesh else "")
    manifest = {"layers": written, "threshold": t, "voxel_size_nm": vs.tolist(),
                "offset_nm": off.tolist(), "shape_zyx": list(raw.shape),
                "volume": str(volume), "segmentation": str(segmentation)}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return manifest
