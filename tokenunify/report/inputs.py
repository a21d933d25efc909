"""Every file the report reads, by role, as the report rule declares them.

The workflow owns the results layout: ``workflow/rules/common.smk`` (``report_inputs``) lists
the files, the report rule declares each as an input (so Snakemake reruns the report when one
changes) and passes the same mapping to ``tokenunify report --inputs JSON``. The report reads
nothing else, except the Snakemake benchmark files below ``benchmarks`` (written by the rules'
``benchmark:`` directives, which other rules cannot declare as inputs; a missing one is only a
note).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenunify.errors import ConfigError

ROLES = ("metrics", "segmentation", "affinities", "data", "training", "neuroglancer")


@dataclass(frozen=True)
class ReportInputs:
    """Paths (as given, relative to the working directory) by role.

    metrics: run -> dataset -> ``metrics.csv`` (test and validate datasets).
    segmentation, affinities: run -> test dataset -> ``segmentation.zarr`` / ``affinities.zarr``.
    data: dataset -> the downloaded volume ``NAME.zarr`` (raw, labels; voxel size).
    training: run -> ``pretrain`` / ``finetune`` -> the model folder (``metrics.jsonl`` inside).
    neuroglancer: run -> test dataset -> the Neuroglancer export folder (linked, with the
        command that opens it; optional).
    benchmarks: the folder of Snakemake benchmark files, or None.
    """

    metrics: dict[str, dict[str, str]] = field(default_factory=dict)
    segmentation: dict[str, dict[str, str]] = field(default_factory=dict)
    affinities: dict[str, dict[str, str]] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    training: dict[str, dict[str, str]] = field(default_factory=dict)
    neuroglancer: dict[str, dict[str, str]] = field(default_factory=dict)
    benchmarks: str | None = None

    @classmethod
    def from_json(cls, text: str) -> ReportInputs:
        """Parse ``--inputs``; a bad document is a ConfigError naming the key."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--inputs is not valid JSON: {exc}") from exc
        unknown = sorted(set(d) - {*ROLES, "benchmarks"})
        if unknown:
            raise ConfigError(f"--inputs: unknown keys {unknown}; known: {[*ROLES, 'benchmarks']}")
        return cls(**d)

    def files(self) -> list[str]:
        """Every declared path (the report rule's inputs), benchmarks left out."""
        out: list[str] = []
        for role in ROLES:
            for v in getattr(self, role).values():
                out.extend(v.values() if isinstance(v, dict) else [v])
        return out

    def path(self, role: str, *keys: str) -> Path:
        """The path of ``role`` for ``keys`` (run, dataset / stage; or a dataset for ``data``).

        Raises:
            ValueError: nothing of that role and keys was declared (the report would otherwise
                compare fewer runs than asked for).
        """
        node = getattr(self, role)
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise ValueError(f"the report was given no {role} input for {'/'.join(keys)} "
                                 f"(declared: {sorted(node) if isinstance(node, dict) else node})")
            node = node[k]
        return Path(node)
