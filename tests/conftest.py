"""Shared fixtures: tiny synthetic volumes, the real volumes in ../shared/data, an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TOKENUNIFY_SHARED_DATA", REPO.parent / "shared" / "data"))
NEUROPROOF = SHARED_DATA / "neuroproof_fib_medulla_250"
GALA = SHARED_DATA / "gala_fib_example"
ISBI = SHARED_DATA / "isbi2012_membrane_2d"
# the public addresses of the real datasets (config/examples) -> their local copies
GITHUB = "https://raw.githubusercontent.com"
MIRROR = ";".join([
    f"{GITHUB}/janelia-flyem/neuroproof_examples/ce839e17deaf4c01153827c6d028dfecfbb4b958/"
    f"training_sample2={NEUROPROOF}",
    f"{GITHUB}/janelia-flyem/gala/db73a1c84d8a99975a2a8fb68660a83d8889ab1e/tests/example-data="
    f"{GALA}",
    f"{GITHUB}/zhixuhao/unet/b45af4d458437d8281cc218a07fd4380818ece4a/data/membrane/train={ISBI}",
])


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Remote fetches and gunzipped files go to a per-session cache, never ~/.cache."""
    os.environ["TOKENUNIFY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for local test servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(path: Path) -> Path:
    """Skip the test with a clear reason when a real dataset is absent."""
    if not path.exists():
        pytest.skip(f"real dataset not present: {path} (see ../shared/data/*/SOURCE.md)")
    return path


@pytest.fixture(scope="session")
def tiny_em():
    """A small synthetic EM volume: dict raw uint8 / labels uint64 / membrane, (16, 96, 96)."""
    from tokenunify.data.synthetic import generate

    return generate((16, 96, 96), seed=7)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def infer_setup(tmp_path_factory, tiny_em):
    """A folder with ``v.zarr`` (array ``raw``: tiny_em's 16 x 96 x 96 uint8, 40 x 8 x 8 nm)
    and ``model.pt`` (an untrained ``tiny`` EMmamba with 3 output channels, seed 0)."""
    import torch
    import zarr

    from tokenunify.io.zarrio import create_volume
    from tokenunify.model import checkpoint as ckpt
    from tokenunify.model.emmamba import EMmamba, preset

    d = tmp_path_factory.mktemp("inf")
    g = zarr.open_group(str(d / "v.zarr"), mode="w")
    create_volume(g, "raw", (16, 96, 96), (16, 96, 96), np.uint8, (40, 8, 8), (0, 0, 0))[:] = \
        tiny_em["raw"]
    torch.manual_seed(0)
    net = EMmamba(preset("tiny", out_channels=3))
    ckpt.save({"model": net.state_dict(), "model_config": net.config.to_dict(), "step": 0},
              d / "model.pt")
    return d
