"""Content identities: what a finished output was made from, chained from download on.

Every stage output (a folder: ``data/*.zarr``, ``tokens/*.zarr``, ``models/*/pretrain``,
``models/*/finetune``, ``affinities.zarr``, ``segmentation.zarr``) records in
:data:`IDENTITY_FILE` a :class:`Lineage`: the stage, a digest of the settings that change the
result, and the identities of its inputs. Its ``identity`` is the digest of all three, so it
changes when any setting or any input anywhere upstream changed, even when the input *paths*
stay the same. :class:`tokenunify.io.zarrio.StagedOutput` resumes a staging folder only when the
recorded lineage equals the current one, and says which part changed otherwise.

Inputs not written by the pipeline (a user's HDF5 file, an imported checkpoint, an output of an
older version) have no identity file; their identity is then taken from the file system (path,
size and modification time of the file, or of a folder's top-level entries), so replacing such
a file still invalidates what was built from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IDENTITY_FILE = ".tokenunify-identity.json"


def digest(obj: Any) -> str:
    """Short sha256 of a JSON-able object (canonical form), used in provenance and resume."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stat_identity(path: Path) -> str:
    """Identity of something the pipeline did not write: path, size and mtime (ns)."""
    def entry(p: Path) -> list:
        st = p.stat()
        return [p.name, st.st_size, st.st_mtime_ns]

    if path.is_dir():
        items = [entry(p) for p in sorted(path.iterdir()) if not p.name.startswith(".")]
    else:
        items = [entry(path)]
    return "stat-" + digest({"path": str(path.resolve()), "entries": items})


def identity_of(path: str | Path) -> str:
    """The identity of a finished output.

    Args:
        path: an output folder, or a file inside one (e.g. ``finetune/checkpoint.pt``: the
            folder's identity), or any other file or folder (identity from the file system).

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    folder = path if path.is_dir() else path.parent
    record = folder / IDENTITY_FILE
    if record.is_file():
        try:
            return str(json.loads(record.read_text())["identity"])
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{record}: unreadable identity record ({exc}); delete the output "
                             f"{folder} and rerun the stage that writes it") from None
    return _stat_identity(path)


#: Settings that decide where, in how many pieces or how verbosely a stage runs, never what it
#: computes: left out of every stage's settings digest, so a resumed run may change them.
RUNTIME_KEYS = frozenset({"workers", "threads_per_worker", "scheduler", "dask", "batch_blocks",
                          "nproc", "log_every"})


def result_settings(settings: dict) -> dict:
    """``settings`` without the :data:`RUNTIME_KEYS`: what changes the result."""
    return {k: v for k, v in settings.items() if k not in RUNTIME_KEYS}


@dataclass(frozen=True)
class Lineage:
    """What an output is made from: stage, settings digest and input identities.

    Args (of :meth:`of`):
        stage: the stage name (``infer``, ...).
        settings: the settings that change the result (not where or how fast it runs).
        inputs: name -> path, or name -> list of paths, of the stage's inputs.
    """

    stage: str
    settings: str
    inputs: dict[str, str | list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, stage: str, settings: Any, inputs: dict[str, Any] | None = None) -> Lineage:
        ids: dict[str, str | list[str]] = {}
        for name, p in (inputs or {}).items():
            if isinstance(p, (list, tuple)):
                ids[name] = [identity_of(q) for q in p]
            else:
                ids[name] = identity_of(p)
        return cls(stage, digest(settings), ids)

    @property
    def identity(self) -> str:
        return digest(asdict(self))

    def to_dict(self) -> dict:
        return {"identity": self.identity, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Lineage:
        return cls(d["stage"], d["settings"], d.get("inputs", {}))

    def differences(self, old: Lineage) -> list[str]:
        """Why ``old`` (a recorded lineage) is not this one, in words."""
        why = []
        if old.stage != self.stage:
            why.append(f"stage {old.stage} -> {self.stage}")
        if old.settings != self.settings:
            why.append("settings changed")
        for name in sorted(set(old.inputs) | set(self.inputs)):
            if old.inputs.get(name) != self.inputs.get(name):
                why.append(f"input '{name}' changed")
        return why or ["unknown"]

    def write(self, folder: str | Path) -> Path:
        """Write the record into ``folder`` (atomically)."""
        path = Path(folder) / IDENTITY_FILE
        tmp = path.with_name(f"{IDENTITY_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Lineage | None:
        """The record in ``folder``, or None (none, or unreadable)."""
        path = Path(folder) / IDENTITY_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
