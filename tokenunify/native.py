"""Building the package's C++ kernels with torch's JIT extension builder (ninja), once per
machine; the builds are cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``).

Used by the fused CPU scan (:mod:`tokenunify.model.scan`) and the compiled global merge
(:mod:`tokenunify.agglomerate.merge`). Each caller keeps its pure-Python path for machines
without a compiler."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path


def load_extension(name: str, source: Path, cflags: list[str], ldflags: list[str] | None = None):
    """Build (or load the cached build of) the C++ file ``source`` as module ``name``.

    Raises whatever the builder raises when a compiler, ninja or the headers are missing."""
    from torch.utils.cpp_extension import load

    # the ninja that pip installed sits beside this interpreter, maybe not on PATH
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    return load(name=name, sources=[str(source)], extra_cflags=cflags,
                extra_ldflags=ldflags or [], verbose=False)
