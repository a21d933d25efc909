"""Building the package's C++ kernels with torch's JIT extension builder (ninja), once per
machine; the builds are cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``).

Used by the fused CPU scan (:mod:`tokenunify.model.scan`) and the compiled global merge
(:mod:`tokenunify.agglomerate.merge`). Each caller keeps its pure-Python path for machines
without a compiler."""

from __future__ import annotations

import logging
import os
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)
_BUILT: dict[str, object] = {}  # build name -> module, or False once known to be unavailable


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


def optional_extension(name: str, source: Path, cflags: list[str], ldflags: list[str] | None,
                       *, disable_env: str, fallback: str):
    """:func:`load_extension` once per process, or None: when the environment variable
    ``disable_env`` is ``0``, or when the build fails (a compiler, ninja or the headers are
    missing), after one warning that names ``fallback``, the pure-Python path used instead."""
    if name not in _BUILT:
        if os.environ.get(disable_env, "1") == "0":
            _BUILT[name] = False
        else:
            try:
                _BUILT[name] = load_extension(name, source, cflags, ldflags)
            except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
                log.warning("%s unavailable (%s); using %s", name,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                            fallback)
                _BUILT[name] = False
    return _BUILT[name] or None
