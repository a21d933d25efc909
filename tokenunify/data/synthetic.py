"""Embedded EM-like volume generator with dense ground truth (the demo's default data).

The tissue is a packing of neurites that run mostly across sections (along z), drift laterally,
change calibre and branch. Each section is the additively weighted Voronoi partition of the
neurites' cross-sections (score ``|p - c_i| - r_i``) on warped coordinates, so cells are rounded,
unequal and wavy-edged like neuropil rather than polygonal confetti. Rendering adds, per voxel:

- dark membranes centred on every boundary between different neurons (never between a neurite
  and its own branch), so the ground truth lines up with the membranes by construction;
- cytoplasm shade per neuron plus low-frequency texture;
- mitochondria (dark ellipses with a darker rim and cristae stripes) elongated along z;
- clusters of synaptic-vesicle rings in boutons;
- in-plane blur, section-to-section brightness/contrast jitter, noise, and occasional defective
  sections (missing = zero fill, or a dark fold band).

Geometry is drawn once from the seed; every section is then rendered independently with its own
seeded random stream, so any box reads the same voxels whatever the blocking (``read`` renders
whole sections and crops). Memory is bounded by the cached sections, not the volume.

Shapes are (z, y, x) in voxels; lengths in the config are in nm and converted with the in-plane
voxel size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import cache

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator parameters. Lengths in nm, rates per section, intensities on a 0..1 scale."""

    shape: tuple[int, int, int] = (32, 256, 256)
    voxel_size: tuple[float, float, float] = (40.0, 8.0, 8.0)
    seed: int = 0
    radius_nm: float = 190.0  # median neurite radius
    radius_sigma: float = 0.45  # lognormal spread of radii
    drift_nm: float = 10.0  # lateral displacement per section (std of the velocity)
    branch_rate: float = 0.006  # branches per neurite per section
    mito_fraction: float = 0.6  # share of thick neurites carrying mitochondria
    bouton_fraction: float = 0.25  # share of neurites with a vesicle cluster
    membrane_nm: float = 10.0  # std of the dark membrane profile
    noise: float = 0.055  # additive Gaussian noise std
    blur_px: float = 0.8  # in-plane Gaussian blur std (voxels)
    defect_rate: float = 0.03  # probability that a section is defective

    @classmethod
    def from_query(cls, q: dict[str, str]) -> SyntheticConfig:
        """Build from URL query values, e.g. ``{"shape": "32,256,256", "seed": "3"}``."""
        known = {f.name: f for f in fields(cls)}
        kw: dict = {}
        for k, v in q.items():
            if k not in known:
                raise ValueError(f"unknown synthetic parameter {k!r}; known: {sorted(known)}")
            if k in ("shape", "voxel_size"):
                vals = [float(t) for t in v.split(",")]
                if len(vals) != 3 or min(vals) <= 0:
                    raise ValueError(f"{k} must be three positive numbers z,y,x, got {v!r}")
                kw[k] = tuple(int(t) for t in vals) if k == "shape" else tuple(vals)
            elif k == "seed":
                kw[k] = int(v)
            else:
                kw[k] = float(v)
        return cls(**kw)


class _Fourier:
    """A smooth random field: a sum of random 3D plane waves, evaluable on any section."""

    def __init__(self, rng: np.random.Generator, n: int, wavelength_px: tuple[float, float],
                 wavelength_z: tuple[float, float], amplitude: float):
        lam = rng.uniform(*wavelength_px, n)
        theta = rng.uniform(0, 2 * np.pi, n)
        self.ky, self.kx = 2 * np.pi / lam * np.sin(theta), 2 * np.pi / lam * np.cos(theta)
        self.kz = 2 * np.pi / rng.uniform(*wavelength_z, n) * rng.choice([-1, 1], n)
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.amp = amplitude * np.sqrt(2.0 / n)

    def section(self, z: int, ny: int, nx: int) -> np.ndarray:
        y = np.arange(ny, dtype=np.float32)[:, None]
        x = np.arange(nx, dtype=np.float32)[None, :]
        out = np.zeros((ny, nx), np.float32)
        for ky, kx, kz, ph in zip(self.ky, self.kx, self.kz, self.phase, strict=True):
            cx = kx * x + (kz * z + ph)
            out += np.cos(ky * y) * np.cos(cx) - np.sin(ky * y) * np.sin(cx)
        return out * self.amp


@dataclass
class _Geometry:
    centers: list[np.ndarray]  # per section: (n, 2) float (y, x) px
    radii: list[np.ndarray]  # per section: (n,) px
    owners: list[np.ndarray]  # per section: (n,) neurite label
    mitos: list[list[tuple]]  # per section: (cy, cx, a, b, phi, label)
    vesicles: list[np.ndarray]  # per section: (m, 3) (y, x, label)
    shade: np.ndarray  # per label cytoplasm level


class SyntheticEM:
    """Deterministic EM-like volume; ``read(key, box)`` with key raw | labels | membrane."""

    def __init__(self, cfg: SyntheticConfig, cache_bytes: int = 256 << 20):
        self.cfg = cfg
        self.px = float(cfg.voxel_size[1])
        rng = np.random.default_rng([cfg.seed, 0])
        self.geom = self._build(rng)
        self.warp_y = _Fourier(rng, 12, (35, 110), (6, 24), 6.0)
        self.warp_x = _Fourier(rng, 12, (35, 110), (6, 24), 6.0)
        self.texture = _Fourier(rng, 24, (4, 30), (1.5, 6), 0.045)
        section_bytes = cfg.shape[1] * cfg.shape[2] * 10
        self._max_cached = max(2, cache_bytes // section_bytes)
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ geometry
    def _build(self, rng: np.random.Generator) -> _Geometry:
        c = self.cfg
        nz, ny, nx = c.shape
        r_med = c.radius_nm / self.px
        margin = 3 * r_med
        area = (ny + 2 * margin) * (nx + 2 * margin)
        n = max(4, int(area / (np.pi * r_med**2 * np.exp(2 * c.radius_sigma**2))))
        drift = c.drift_nm / self.px
        paths = []  # (z0, z1, centers (len, 2), radii (len,), label)

        def walk(start, v, length, r0, label, z0):
            pos = np.empty((length, 2))
            p, vel = np.array(start, float), np.array(v, float)
            for i in range(length):
                pos[i] = p
                vel = 0.92 * vel + rng.normal(0, 0.35 * drift, 2)
                p = p + vel
            calibre = np.exp(0.15 * np.cumsum(rng.normal(0, 0.25, length)).clip(-2, 2))
            paths.append((z0, z0 + length, pos, r0 * calibre, label))
            return pos

        for label in range(1, n + 1):
            if rng.random() < 0.75:
                z0, z1 = 0, nz
            else:  # neurites that start or end inside the volume
                a, b = sorted(rng.integers(-nz // 2, nz + nz // 2, 2))
                z0, z1 = max(0, a), min(nz, max(b, a + 4))
                if z1 - z0 < 2:
                    z0, z1 = 0, nz
            start = (rng.uniform(-margin, ny + margin), rng.uniform(-margin, nx + margin))
            r0 = r_med * np.exp(rng.normal(0, c.radius_sigma))
            pos = walk(start, rng.normal(0, drift, 2), z1 - z0, r0, label, z0)
            for i in range(z1 - z0 - 3):  # branches share the parent's label
                if rng.random() < c.branch_rate:
                    ang = rng.uniform(0, 2 * np.pi)
                    kick = (r0 / 2.5) * np.array([np.sin(ang), np.cos(ang)])
                    walk(pos[i], kick, z1 - z0 - i, r0 * rng.uniform(0.5, 0.8), label, z0 + i)
        shade = rng.uniform(0.64, 0.80, n + 1).astype(np.float32)

        per = [[] for _ in range(nz)]
        for z0, _z1, pos, rad, label in paths:
            for i in range(len(pos)):
                per[z0 + i].append((pos[i, 0], pos[i, 1], rad[i], label))
        centers, radii, owners = [], [], []
        for items in per:
            a = np.array(items, float).reshape(-1, 4)
            centers.append(a[:, :2])
            radii.append(a[:, 2])
            owners.append(a[:, 3].astype(np.int64))

        mitos: list[list[tuple]] = [[] for _ in range(nz)]
        vesicles: list[list] = [[] for _ in range(nz)]
        for z0, z1, pos, rad, label in paths:
            if rad[0] > 0.9 * r_med and rng.random() < c.mito_fraction:
                for _ in range(rng.integers(1, 3)):
                    length = int(rng.integers(3, 12))
                    za = int(rng.integers(z0, max(z0 + 1, z1 - 1)))
                    rho, th = rng.uniform(0, 0.35), rng.uniform(0, 2 * np.pi)
                    a_frac = rng.uniform(0.35, 0.55)
                    b_frac = a_frac * rng.uniform(0.45, 0.7)
                    phi = rng.uniform(0, np.pi)
                    for zz in range(za, min(z1, za + length)):
                        i = zz - z0
                        r = rad[i]
                        mitos[zz].append((pos[i, 0] + rho * r * np.sin(th),
                                          pos[i, 1] + rho * r * np.cos(th),
                                          a_frac * r, b_frac * r, phi, label))
            if rng.random() < c.bouton_fraction:
                length = int(rng.integers(2, 6))
                za = int(rng.integers(z0, max(z0 + 1, z1 - 1)))
                th = rng.uniform(0, 2 * np.pi)
                for zz in range(za, min(z1, za + length)):
                    i = zz - z0
                    r = rad[i]
                    cy = pos[i, 0] + 0.3 * r * np.sin(th)
                    cx = pos[i, 1] + 0.3 * r * np.cos(th)
                    m = rng.poisson(max(1.0, 0.12 * (0.6 * r) ** 2))
                    rr = 0.6 * r * np.sqrt(rng.uniform(0, 1, m))
                    aa = rng.uniform(0, 2 * np.pi, m)
                    for y, x in zip(cy + rr * np.sin(aa), cx + rr * np.cos(aa), strict=True):
                        vesicles[zz].append((y, x, label))
        return _Geometry(centers, radii, owners, mitos,
                         [np.array(v, float).reshape(-1, 3) for v in vesicles], shade)

    # ------------------------------------------------------------------ rendering
    def _partition(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels (ny, nx) uint64 and half-gap to the nearest other neuron (px) of section z."""
        _, ny, nx = self.cfg.shape
        g = self.geom
        cen, rad, own = g.centers[z], g.radii[z], g.owners[z]
        yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
        qy = yy + self.warp_y.section(z, ny, nx)
        qx = xx + self.warp_x.section(z, ny, nx)
        pts = np.stack([qy.ravel(), qx.ravel()], 1)
        if len(cen) == 0:
            return np.zeros((ny, nx), np.uint64), np.full((ny, nx), np.inf, np.float32)
        # Additive weights are capped so that the winner is always among the k nearest centres.
        r_med = self.cfg.radius_nm / self.px
        weight = np.clip(rad, 0.5 * r_med, 1.6 * r_med)
        k = min(24, len(cen))
        d, idx = cKDTree(cen).query(pts, k=k)
        d, idx = d.reshape(len(pts), k), idx.reshape(len(pts), k)
        s = d - weight[idx]
        lab = own[idx]
        best = np.argmin(s, axis=1)
        rows = np.arange(len(pts))
        s1, l1 = s[rows, best], lab[rows, best]
        s2 = np.where(lab != l1[:, None], s, np.inf).min(axis=1)
        half_gap = ((s2 - s1) / 2).astype(np.float32)
        return l1.reshape(ny, nx).astype(np.uint64), half_gap.reshape(ny, nx)

    def render_section(self, z: int) -> dict[str, np.ndarray]:
        """Render section z: ``raw`` uint8, ``labels`` uint64 and ``membrane`` uint8 (0/1)."""
        c = self.cfg
        _, ny, nx = c.shape
        labels, gap = self._partition(z)
        rng = np.random.default_rng([c.seed, 1, z])
        w = c.membrane_nm / self.px
        memb = np.exp(-0.5 * (gap / w) ** 2)
        img = self.geom.shade[labels.astype(np.int64)] + self.texture.section(z, ny, nx)
        img *= 1.0 - 0.62 * memb
        inner = gap > 1.5 * w
        yy, xx = np.ogrid[0:ny, 0:nx]
        for cy, cx, a, b, phi, lab in self.geom.mitos[z]:
            y0, y1 = max(0, int(cy - a - 2)), min(ny, int(cy + a + 3))
            x0, x1 = max(0, int(cx - a - 2)), min(nx, int(cx + a + 3))
            if y0 >= y1 or x0 >= x1:
                continue
            dy, dx = yy[y0:y1] - cy, xx[:, x0:x1] - cx
            u = dy * np.cos(phi) + dx * np.sin(phi)
            v = -dy * np.sin(phi) + dx * np.cos(phi)
            e = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            m = (e < 1) & (labels[y0:y1, x0:x1] == lab) & inner[y0:y1, x0:x1]
            val = 0.44 + 0.07 * np.sin(2 * np.pi * u / 3.5)
            val = np.where(e > 0.78, 0.30, val)
            img[y0:y1, x0:x1] = np.where(m, val, img[y0:y1, x0:x1])
        rv = 20.0 / self.px  # vesicle radius, 20 nm
        for vy, vx, lab in self.geom.vesicles[z]:
            y0, y1 = max(0, int(vy - rv - 3)), min(ny, int(vy + rv + 4))
            x0, x1 = max(0, int(vx - rv - 3)), min(nx, int(vx + rv + 4))
            if y0 >= y1 or x0 >= x1:
                continue
            rho = np.sqrt((yy[y0:y1] - vy) ** 2 + (xx[:, x0:x1] - vx) ** 2)
            ring = np.exp(-0.5 * ((rho - rv) / 0.7) ** 2)
            m = (labels[y0:y1, x0:x1] == lab) & inner[y0:y1, x0:x1]
            patch = img[y0:y1, x0:x1]
            img[y0:y1, x0:x1] = np.where(m, patch * (1 - 0.45 * ring), patch)
        img = ndimage.gaussian_filter(img, c.blur_px) if c.blur_px > 0 else img
        img = img * rng.normal(1.0, 0.06) + rng.normal(0.0, 0.03)
        img = img + rng.normal(0.0, c.noise, img.shape).astype(np.float32)
        if rng.random() < c.defect_rate:
            if rng.random() < 0.5:  # missing section: zero fill
                img[:] = 0.0
            else:  # a dark fold band across the section
                ang = rng.uniform(0, np.pi)
                dist = (yy - rng.uniform(0, ny)) * np.cos(ang) - (xx - rng.uniform(0, nx)) * \
                    np.sin(ang)
                img = img * np.where(np.abs(dist) < rng.uniform(3, 8), 0.2, 1.0)
        raw = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        return {"raw": raw, "labels": labels, "membrane": (memb > 0.2).astype(np.uint8)}

    def section(self, z: int) -> dict[str, np.ndarray]:
        """Rendered section z, from a small LRU cache."""
        with self._lock:
            if z in self._cache:
                self._cache.move_to_end(z)
                return self._cache[z]
        out = self.render_section(z)
        with self._lock:
            self._cache[z] = out
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return out

    def read(self, key: str, box: Box) -> np.ndarray:
        """Voxels of ``key`` in ``box`` (z, y, x slices with explicit bounds)."""
        zs, ys, xs = box
        dtype = np.uint64 if key == "labels" else np.uint8
        out = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), dtype)
        for i, z in enumerate(range(zs.start, zs.stop)):
            out[i] = self.section(z)[key][ys, xs]
        return out

    def volume(self) -> dict[str, np.ndarray]:
        """The whole volume (small volumes only): raw, labels, membrane."""
        box = tuple(slice(0, n) for n in self.cfg.shape)
        return {k: self.read(k, box) for k in ("raw", "labels", "membrane")}


@cache
def get_generator(cfg: SyntheticConfig) -> SyntheticEM:
    """One shared generator per config (geometry is built once per process)."""
    return SyntheticEM(cfg)


def generate(shape=(32, 256, 256), seed: int = 0, **kw) -> dict[str, np.ndarray]:
    """Convenience: a whole synthetic volume as numpy arrays (raw uint8, labels uint64)."""
    return SyntheticEM(SyntheticConfig(shape=tuple(shape), seed=seed, **kw)).volume()
