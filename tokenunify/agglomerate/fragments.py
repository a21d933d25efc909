"""Fragments (supervoxels) from affinities: the official seeded watershed per section, or one
of two 3-D methods in 3-D tiles (:func:`block_fragments_3d`): waterz's watershed on the
affinity graph, or the seeded watershed in 3-D (``maxima_distance_3d``, :func:`distance_fragments`).

TokenUnify's post-processing (the official code's ``utils/fragment.py``, ``maxima_distance``)
works on each z-section in 2-D:

- boundary map ``b = 1 - (aff_y + aff_x) / 2``;
- seeds: connected components (4-connected) of the regional maxima (8-connected) of the
  *squared* Euclidean distance transform of ``b < 0.5``;
- ``watershed(b, seeds)`` (4-connected), ids offset so that they are unique across sections.

Blockwise, the same computation runs on a fixed global grid of *tiles* (one section high,
``tile`` voxels in y and x), each from the affinities of the tile grown by ``context`` voxels
in y and x and then cropped to the tile. A tile's fragments therefore depend only on the tile,
never on how the volume is cut into processing blocks, as long as block edges lie on tile edges
(checked). A fragment that crosses a tile edge is split there, on purpose; the agglomeration
joins the pieces again through the high affinities across the cut. Ids are made global with a
count per tile and offsets in tile raster order (z, tile-y, tile-x), so they are compact and
identical for every block decomposition. ``tile=None`` computes whole sections (the reference).

Affinities here are float32 in [0, 1], shape (3, z, y, x), channels (z, y, x), offsets
(-1,0,0), (0,-1,0), (0,0,-1), stored at the voxel the offset points from.
"""

from __future__ import annotations

import edt
import numpy as np
from scipy import ndimage
from skimage.measure import label
from skimage.morphology import local_maxima
from skimage.segmentation import watershed


def section_fragments(aff_y: np.ndarray, aff_x: np.ndarray, mask: np.ndarray | None = None,
                      seed_threshold: float = 0.5) -> np.ndarray:
    """Seeded watershed of one section. aff_y, aff_x: (y, x) float in [0, 1].

    Returns fragments (y, x) uint32, one id per seed. ``mask`` (bool, (y, x)) marks voxels
    that may be labelled (False = outside the data); None: all.
    """
    b = 1.0 - 0.5 * (aff_y.astype(np.float32) + aff_x.astype(np.float32))
    inside = b < seed_threshold
    if mask is not None:
        inside &= mask
    dist = edt.edtsq(inside.astype(np.uint8), black_border=False)
    if dist.any():
        seeds = label(local_maxima(dist, connectivity=2) & inside, connectivity=1)
    else:  # no interior at all: one seed for the whole section, as regmax of a flat map gives
        seeds = np.ones(b.shape, np.int32) if mask is None else mask.astype(np.int32)
    return watershed(b, seeds, connectivity=1, mask=mask).astype(np.uint32)


def _renumber(frag: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids to 1..n in order of increasing old id (0 stays 0)."""
    ids, inv = np.unique(frag, return_inverse=True)
    inv = inv.reshape(frag.shape).astype(np.uint32)
    if ids[0] == 0:
        return inv, len(ids) - 1
    return inv + 1, len(ids)


def tile_grid(shape_yx, tile: int) -> tuple[int, int]:
    """Number of tiles along y and x."""
    return (-(-shape_yx[0] // tile), -(-shape_yx[1] // tile))


def block_fragments(aff: np.ndarray, origin_yx: tuple[int, int], core_yx: tuple[int, int],
                    tile: int | None, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile fragments of a block, with local (per-tile) ids.

    Args:
        aff: (3, z, y, x) float32 affinities of the block's sections, grown by ``context`` in y
            and x where the volume allows; ``origin_yx`` is the position of the block's core
            inside ``aff`` and ``core_yx`` its size. The core's y/x start must be a multiple of
            ``tile`` in volume coordinates (the caller checks).
        tile: tile edge (voxels, y and x), or None for whole sections (no tiling).
        context: voxels of context around each tile (ignored when tile is None).

    Returns:
        (fragments (z, cy, cx) uint32 with ids 1..n per tile, counts (z, ty, tx) int64).
    """
    nz = aff.shape[1]
    oy, ox = origin_yx
    cy, cx = core_yx
    out = np.zeros((nz, cy, cx), np.uint32)
    if tile is None:
        counts = np.zeros((nz, 1, 1), np.int64)
        for z in range(nz):
            f = section_fragments(aff[1, z, oy:oy + cy, ox:ox + cx],
                                  aff[2, z, oy:oy + cy, ox:ox + cx])
            out[z], counts[z, 0, 0] = _renumber(f)
        return out, counts
    ty, tx = tile_grid((cy, cx), tile)
    counts = np.zeros((nz, ty, tx), np.int64)
    H, W = aff.shape[2:]
    for z in range(nz):
        for i in range(ty):
            for j in range(tx):
                y0, x0 = oy + i * tile, ox + j * tile  # tile start inside aff
                y1, x1 = min(y0 + tile, oy + cy), min(x0 + tile, ox + cx)
                wy0, wx0 = max(0, y0 - context), max(0, x0 - context)
                wy1, wx1 = min(H, y1 + context), min(W, x1 + context)
                f = section_fragments(aff[1, z, wy0:wy1, wx0:wx1], aff[2, z, wy0:wy1, wx0:wx1])
                crop = f[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]
                loc, n = _renumber(crop)
                out[z, y0 - oy:y1 - oy, x0 - ox:x1 - ox] = loc
                counts[z, i, j] = n
    return out, counts


def watershed_fragments(aff: np.ndarray) -> np.ndarray:
    """waterz's 3-D watershed on the affinity graph of a (3, z, y, x) float32 window: the
    fragments of ``agglomerate.method: waterz`` before any merge, uint32 ids 1..n (0 where
    waterz leaves a voxel out). Unlike the per-section seeded watershed, it follows the
    affinity of every voxel pair, so a 1-voxel membrane between two objects (z included)
    separates them; on isotropic FIB-SEM this is what thin processes need
    (benchmarks/bench_fragments_ceiling.py)."""
    import waterz

    seg = next(iter(waterz.agglomerate(np.ascontiguousarray(aff, dtype=np.float32), [0.0])))
    return _renumber(seg)[0]


#: maxima_distance_3d: voxels whose mean affinity is above this are inside an object
SEED_THRESHOLD_3D = 0.5
#: maxima_distance_3d: Gaussian smoothing of the distance transform before seeding (voxels)
SEED_SIGMA_3D = 1.0
#: maxima_distance_3d: a seed is a voxel that is the largest distance in this cube (voxels)
SEED_WINDOW_3D = 5


def distance_fragments(aff: np.ndarray, threshold: float = SEED_THRESHOLD_3D,
                       sigma: float = SEED_SIGMA_3D, window: int = SEED_WINDOW_3D) -> np.ndarray:
    """The seeded watershed in 3-D (``fragments: maxima_distance_3d``) of a (3, z, y, x)
    float32 window, uint32 ids 1..n.

    - boundary map ``b = 1 - mean(aff_z, aff_y, aff_x)``;
    - inside: ``b < 1 - threshold``; its Euclidean distance transform (voxel units),
      smoothed by a Gaussian of ``sigma`` voxels;
    - seeds: 6-connected components of the voxels inside that hold the largest smoothed
      distance of the ``window``-cube around them;
    - ``watershed(b, seeds)`` (6-connected), so membrane voxels join the side they are closer
      to in affinity.

    This is the daisy / LSD style of fragment (seeds where objects are thickest, flooding the
    boundary map) in 3-D. Unlike the per-section method it follows z, and unlike waterz's
    watershed (about 5·10^5 fragments of a few voxels on a 3.1-Mvoxel NeuroProof part, whose
    merge scores are then noise) it gives about a thousand there, each holding one thick part
    of an object (benchmarks/bench_neuroproof_choices.py). Distances are in
    voxels: meant for near-isotropic volumes (FIB-SEM); on anisotropic serial sections the
    per-section ``maxima_distance`` suits better. The pipeline uses the module's defaults;
    ``benchmarks/bench_seed_variants.py`` measures others on validation affinities.
    """
    b = 1.0 - aff.astype(np.float32).mean(axis=0)
    inside = b < 1.0 - threshold
    dist = edt.edt(inside.astype(np.uint8), black_border=False).astype(np.float32)
    if sigma:
        dist = ndimage.gaussian_filter(dist, sigma)
    peaks = (ndimage.maximum_filter(dist, size=window) == dist) & inside
    seeds, n = ndimage.label(peaks)
    if n == 0:  # no interior at all: one fragment, as the per-section method gives
        return np.ones(b.shape, np.uint32)
    return watershed(b, seeds, connectivity=1).astype(np.uint32)


#: fragments methods that work in 3-D tiles, and the function that makes a tile's fragments
VOLUME_FRAGMENTS = {"waterz": watershed_fragments, "maxima_distance_3d": distance_fragments}


def block_fragments_3d(aff: np.ndarray, origin: tuple[int, int, int],
                       core: tuple[int, int, int], tile: int, tile_z: int,
                       context: int, method: str = "waterz") -> tuple[np.ndarray, np.ndarray]:
    """3-D tile fragments of a block (``method``: a key of :data:`VOLUME_FRAGMENTS`), with
    local (per-tile) ids.

    Tiles are ``tile_z`` sections deep and ``tile`` voxels wide on a fixed global grid; each is
    computed from the affinities of the tile grown by ``context`` voxels on every side (as far
    as ``aff`` reaches) and cropped to the tile, so it does not depend on the blocking.

    Args:
        aff: (3, z, y, x) float32 affinities of the block grown by ``context`` where the volume
            allows; ``origin`` is the core's first voxel inside ``aff`` and ``core`` its size.
            The core's start must be a multiple of (tile_z, tile, tile) in volume coordinates.

    Returns:
        (fragments (cz, cy, cx) uint32 with ids 1..n per tile, counts (tz, ty, tx) int64).
    """
    oz, oy, ox = origin
    cz, cy, cx = core
    out = np.zeros(core, np.uint32)
    grid = (-(-cz // tile_z), -(-cy // tile), -(-cx // tile))
    counts = np.zeros(grid, np.int64)
    size = (tile_z, tile, tile)
    for k, i, j in np.ndindex(*grid):
        lo = [o + n * t for o, n, t in zip(origin, (k, i, j), size, strict=True)]
        hi = [min(a + t, o + c) for a, t, o, c in zip(lo, size, origin, core, strict=True)]
        wlo = [max(0, a - context) for a in lo]
        whi = [min(n, b + context) for b, n in zip(hi, aff.shape[1:], strict=True)]
        f = VOLUME_FRAGMENTS[method](aff[:, wlo[0]:whi[0], wlo[1]:whi[1], wlo[2]:whi[2]])
        crop = f[tuple(slice(a - w, b - w) for a, b, w in zip(lo, hi, wlo, strict=True))]
        loc, n = _renumber(crop)
        out[lo[0] - oz:hi[0] - oz, lo[1] - oy:hi[1] - oy, lo[2] - ox:hi[2] - ox] = loc
        counts[k, i, j] = n
    return out, counts


def globalize(local: np.ndarray, offsets: np.ndarray, z0: int, y0: int, x0: int,
              tile: int | None, tile_z: int = 1) -> np.ndarray:
    """Local per-tile ids (z, y, x) at volume position (z0, y0, x0) -> global uint64 ids.

    ``offsets`` (Z / tile_z, TY, TX) uint64: ids before each tile in raster order (tiles one
    section deep unless ``tile_z``). Zero stays zero.
    """
    nz, ny, nx = local.shape
    if tile is None:
        off = offsets[z0:z0 + nz, 0, 0][:, None, None]
    else:
        ty = (np.arange(y0, y0 + ny) // tile)[None, :, None]
        tx = (np.arange(x0, x0 + nx) // tile)[None, None, :]
        off = offsets[(np.arange(z0, z0 + nz) // tile_z)[:, None, None], ty, tx]
    return np.where(local != 0, local.astype(np.uint64) + off.astype(np.uint64), 0)


def whole_volume_fragments(aff: np.ndarray, tile: int | None = None,
                           context: int = 16) -> np.ndarray:
    """Fragments of a whole (3, z, y, x) float32 affinity volume, global uint64 ids 1..n."""
    local, counts = block_fragments(aff, (0, 0), aff.shape[2:], tile, context)
    offsets = tile_offsets(counts)
    return globalize(local, offsets, 0, 0, 0, tile)


def tile_offsets(counts: np.ndarray) -> np.ndarray:
    """Exclusive cumulative sum of per-tile counts in raster order, (Z, TY, TX) uint64."""
    flat = counts.astype(np.uint64).ravel()
    off = np.concatenate([[0], np.cumsum(flat)[:-1]]).astype(np.uint64)
    return off.reshape(counts.shape)
