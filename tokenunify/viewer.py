"""``tokenunify view``: a local Neuroglancer viewer of exported results (:mod:`tokenunify.export`).

Local servers, all bound to 127.0.0.1 unless told otherwise: one file server per export folder,
which serves that folder only (cloud-volume's precomputed handler on a threaded server: it
answers CORS and range requests and serves cloud-volume's gzip chunk files decompressed), and
the ``neuroglancer``
package's own server, which also serves the Neuroglancer client, so nothing is fetched from
the internet. The first folder gives the raw, affinity (hidden) and ground-truth layers and
its segmentation; every further folder adds its segmentation, named after its experiment.

``--screenshot`` opens the viewer in headless Chromium (software WebGL), waits until every
visible layer has loaded (Neuroglancer's own screenshot request) and writes a PNG.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

AFFINITY_SHADER = """#uicontrol float brightness slider(min=0, max=2, default=1)
void main() {
  emitRGB(brightness * vec3(toNormalized(getDataValue(0)), toNormalized(getDataValue(1)),
                            toNormalized(getDataValue(2))));
}
"""
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass
class Export:
    """One export folder and what its ``layers.json`` says."""

    path: Path
    name: str
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> Export:
        from tokenunify.export import MANIFEST

        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"{path}: not an export folder (no {MANIFEST}; write one "
                                    f"with `tokenunify export` or the workflow's export rule)")
        return cls(path, path.parent.parent.name or path.name,
                   json.loads((path / MANIFEST).read_text()))


def serve_folder(folder: Path, bind: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, str]:
    """Serve one export ``folder`` (only it: nothing above it is reachable) over HTTP on a free
    port in a daemon thread; returns (server, base URL). Paths with '..' are refused."""
    from cloudvolume.server import ViewerServerHandler

    root = Path(folder).resolve()

    class Quiet(ViewerServerHandler):
        def log_message(self, fmt, *args):  # requests to the debug log, not stderr
            log.debug("file server: " + fmt, *args)

    server = ThreadingHTTPServer((bind, 0), lambda *a: Quiet(f"file://{root}", *a))
    threading.Thread(target=server.serve_forever, daemon=True, name="export-files").start()
    return server, f"http://{bind}:{server.server_address[1]}"


def build_viewer(exports: list[Export], bases: list[str], bind: str = "127.0.0.1",
                 port: int = 0, layout: str = "xy-3d"):
    """A ``neuroglancer.Viewer`` with the exports' layers (each served at its base URL),
    centred on the first volume."""
    import neuroglancer

    neuroglancer.set_server_bind_address(bind, port)
    viewer = neuroglancer.Viewer()
    base_of = {id(e): b for e, b in zip(exports, bases, strict=True)}

    def src(e: Export, layer: str) -> str:
        return f"precomputed://{base_of[id(e)]}/{layer}"

    first = exports[0]
    m = first.manifest
    vs = m["voxel_size_nm"]
    shape = m["shape_zyx"]
    offset_vox = [o / v for o, v in zip(m["offset_nm"], vs, strict=True)]
    with viewer.txn() as s:
        s.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm",
                                                    scales=vs[::-1])
        s.layers["raw"] = neuroglancer.ImageLayer(source=src(first, "raw"))
        if "affinities" in m["layers"]:
            s.layers.append(name="affinities", visible=False, layer=neuroglancer.ImageLayer(
                source=src(first, "affinities"), shader=AFFINITY_SHADER))
        if "ground_truth" in m["layers"]:
            s.layers.append(name="ground truth", visible=False,
                            layer=neuroglancer.SegmentationLayer(
                                source=src(first, "ground_truth")))
        for e in exports:
            name = f"{e.name} segmentation (t = {e.manifest['threshold']:g})"
            s.layers[name] = neuroglancer.SegmentationLayer(source=src(e, "segmentation"),
                                                            selected_alpha=0.45)
        s.position = [o + n / 2 for o, n in zip(offset_vox[::-1], shape[::-1], strict=True)]
        s.cross_section_scale = max(shape[1], shape[2]) / 500  # voxels per pixel: all of y, x
        s.layout = layout
    return viewer


def find_browser() -> str | None:
    """Chromium's executable: ``TOKENUNIFY_CHROMIUM`` or the first of :data:`BROWSERS` found."""
    env = os.environ.get("TOKENUNIFY_CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).is_file() else None
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def screenshot(viewer, out: str | Path, size=(1000, 700), timeout: float = 120) -> Path:
    """Open ``viewer`` in headless Chromium, wait until its layers have loaded, write a PNG."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium to take the screenshot with (install Debian's "
                                "`chromium`, or set TOKENUNIFY_CHROMIUM to its path)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader", "--disable-gpu-sandbox", f"--user-data-dir={profile}",
             f"--window-size={size[0]},{size[1]}", "--remote-debugging-port=0",
             viewer.get_viewer_url()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result = {}

            def take():
                result["shot"] = viewer.screenshot(size=list(size))

            worker = threading.Thread(target=take, daemon=True)
            worker.start()
            worker.join(timeout)
            if "shot" not in result:
                raise TimeoutError(f"the viewer did not finish loading in {timeout:g} s "
                                   f"({browser})")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(result["shot"].screenshot.image)
    os.replace(tmp, out)
    return out


def view(folders: list[str | Path], bind: str = "127.0.0.1", port: int = 0,
         shot: str | Path | None = None, size=(1000, 700), layout: str = "xy-3d"):
    """Serve the export ``folders`` (one file server each) and open them in a Neuroglancer
    viewer; returns (viewer, file servers). With ``shot``, also writes a screenshot there."""
    exports = [Export.open(f) for f in folders]
    served = [serve_folder(e.path, bind) for e in exports]
    viewer = build_viewer(exports, [b for _, b in served], bind, port, layout)
    if shot is not None:
        screenshot(viewer, shot, size)
    return viewer, [srv for srv, _ in served]
